// Certificate generation for `tandem certs`: a CA and certificates it signs, through OpenSSL.
#ifndef CTANDEM_CERTS_H
#define CTANDEM_CERTS_H
#include <stddef.h>
#ifdef __cplusplus
extern "C" {
#endif

/// Creates a self-signed CA (EC P-256, basicConstraints CA:TRUE, keyCertSign) valid `days` days,
/// writing PEM files `cert_path` and `key_path` (mode 0600). Returns 0, or -1 with `err` filled.
int ctandem_cert_make_ca(const char *common_name, int days, const char *cert_path,
                         const char *key_path, char *err, size_t err_len);

/// Creates a certificate for `common_name` signed by the CA in `ca_cert_path`/`ca_key_path`.
/// `sans` is a comma-separated list of subject alternative names: entries that parse as IPv4 or
/// IPv6 addresses become IP SANs, others DNS SANs (the common name is always added as DNS).
/// Extended key usage is serverAuth and clientAuth, so one certificate serves both ends of a link.
/// `days_valid` may be negative to make an already-expired certificate (for tests).
int ctandem_cert_make_signed(const char *common_name, const char *sans, int days_valid,
                             const char *ca_cert_path, const char *ca_key_path,
                             const char *cert_path, const char *key_path, char *err,
                             size_t err_len);
#ifdef __cplusplus
}
#endif
#endif
