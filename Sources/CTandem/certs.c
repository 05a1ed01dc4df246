// Certificate generation for `tandem certs`, through OpenSSL 3's non-deprecated APIs.
//
// Every key is EC P-256 and every certificate is X.509 v3 signed with SHA-256, with a random
// 128-bit serial number and subject "O=Tandem, CN=<common name>". Errors never abort: each path
// frees what it allocated, clears OpenSSL's error queue and returns -1 with a sentence in `err`.

#include "ctandem_certs.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <openssl/asn1.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

// Validity periods are bounded so that day arithmetic cannot overflow an int and the dates stay
// inside what ASN1_TIME can represent (year 9999).
#define CERT_MAX_DAYS 2000000
// RFC 1035: a DNS name is at most 253 characters in text form.
#define SAN_MAX_LEN 253

// ---------------------------------------------------------------------------------------------
// Errors

static void set_err(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t err_len, const char *fmt, ...) {
    if (err == NULL || err_len == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

// The earliest error on OpenSSL's queue (usually the root cause) as text; empties the queue.
static const char *ossl_reason(char *buf, size_t len) {
    unsigned long e = ERR_peek_error();
    if (e == 0) {
        snprintf(buf, len, "unknown OpenSSL error");
    } else {
        const char *reason = ERR_reason_error_string(e);
        if (reason != NULL)
            snprintf(buf, len, "%s", reason);
        else
            ERR_error_string_n(e, buf, len);
    }
    ERR_clear_error();
    return buf;
}

// Fills `err` with "<what>: <OpenSSL reason>" and returns -1.
static int fail_ossl(char *err, size_t err_len, const char *what) {
    char reason[256];
    ossl_reason(reason, sizeof reason);
    set_err(err, err_len, "%s: %s", what, reason);
    return -1;
}

// ---------------------------------------------------------------------------------------------
// Building blocks

static EVP_PKEY *new_p256_key(void) { return EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256"); }

// A random positive 128-bit serial number (17 DER octets at most, within RFC 5280's 20).
static int set_random_serial(X509 *x) {
    unsigned char bytes[16];
    if (RAND_bytes(bytes, (int)sizeof bytes) != 1) return 0;
    BIGNUM *bn = BN_bin2bn(bytes, (int)sizeof bytes, NULL);
    OPENSSL_cleanse(bytes, sizeof bytes);
    if (bn == NULL) return 0;
    if (BN_is_zero(bn) && !BN_one(bn)) {
        BN_free(bn);
        return 0;
    }
    int ok = BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)) != NULL;
    BN_free(bn);
    return ok;
}

// Builds "O=Tandem, CN=<common_name>" and sets it as the subject (and as the issuer when
// `self_issued`). Fails if the common name is too long for X.509 (64 characters).
static int set_subject(X509 *x, const char *common_name, int self_issued) {
    X509_NAME *name = X509_NAME_new();
    if (name == NULL) return 0;
    int ok = X509_NAME_add_entry_by_txt(name, "O", MBSTRING_UTF8,
                                        (const unsigned char *)"Tandem", -1, -1, 0) == 1 &&
             X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                                        (const unsigned char *)common_name, -1, -1, 0) == 1 &&
             X509_set_subject_name(x, name) == 1 &&
             (!self_issued || X509_set_issuer_name(x, name) == 1);
    X509_NAME_free(name);
    return ok;
}

// notBefore = now - before_seconds - before_days, notAfter = now + after_days.
static int set_validity(X509 *x, int before_days, long before_seconds, int after_days) {
    return X509_time_adj_ex(X509_getm_notBefore(x), -before_days, -before_seconds, NULL) != NULL &&
           X509_time_adj_ex(X509_getm_notAfter(x), after_days, 0, NULL) != NULL;
}

// Adds one extension written in OpenSSL's configuration syntax ("critical,CA:TRUE", ...).
static int add_ext(X509 *x, X509V3_CTX *ctx, int nid, const char *value) {
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, ctx, nid, value);
    if (ext == NULL) return 0;
    int ok = X509_add_ext(x, ext, -1) == 1;
    X509_EXTENSION_free(ext);
    return ok;
}

// ---------------------------------------------------------------------------------------------
// Subject alternative names

static int is_dns_char(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '-' || c == '.' || c == '_' || c == '*';
}

// Whether `gens` already holds a name of `type` with these bytes (DNS names compare
// case-insensitively).
static int san_present(const GENERAL_NAMES *gens, int type, const unsigned char *data, int len) {
    for (int i = 0; i < sk_GENERAL_NAME_num(gens); i++) {
        const GENERAL_NAME *gn = sk_GENERAL_NAME_value(gens, i);
        int t;
        const ASN1_STRING *s = GENERAL_NAME_get0_value(gn, &t);
        if (t != type || s == NULL || ASN1_STRING_length(s) != len) continue;
        const unsigned char *d = ASN1_STRING_get0_data(s);
        if (type == GEN_DNS ? strncasecmp((const char *)d, (const char *)data, (size_t)len) == 0
                            : memcmp(d, data, (size_t)len) == 0)
            return 1;
    }
    return 0;
}

// Appends `entry` (`len` bytes, already trimmed, not NUL-terminated) as an IP name when it parses
// as an IPv4 or IPv6 address and as a DNS name otherwise, unless it is already present.
// Returns 0, or -1 with `err` filled.
static int san_add(GENERAL_NAMES *gens, const char *entry, size_t len, char *err, size_t err_len) {
    if (len > SAN_MAX_LEN) {
        set_err(err, err_len, "subject alternative name '%.40s...' is longer than %d characters",
                entry, SAN_MAX_LEN);
        return -1;
    }
    char text[SAN_MAX_LEN + 1];
    memcpy(text, entry, len);
    text[len] = '\0';

    unsigned char addr[16];
    int type, n;
    const unsigned char *data;
    if (inet_pton(AF_INET, text, addr) == 1) {
        type = GEN_IPADD;
        data = addr;
        n = 4;
    } else if (inet_pton(AF_INET6, text, addr) == 1) {
        type = GEN_IPADD;
        data = addr;
        n = 16;
    } else {
        for (size_t i = 0; i < len; i++) {
            if (!is_dns_char((unsigned char)text[i])) {
                set_err(err, err_len,
                        "invalid subject alternative name '%s': not an IP address, and a DNS "
                        "name may contain only letters, digits, '-', '.', '_' and '*'",
                        text);
                return -1;
            }
        }
        type = GEN_DNS;
        data = (const unsigned char *)text;
        n = (int)len;
    }
    if (san_present(gens, type, data, n)) return 0;

    GENERAL_NAME *gn = GENERAL_NAME_new();
    ASN1_STRING *value = type == GEN_DNS ? ASN1_IA5STRING_new() : ASN1_OCTET_STRING_new();
    if (gn == NULL || value == NULL || ASN1_STRING_set(value, data, n) != 1) {
        GENERAL_NAME_free(gn);
        ASN1_STRING_free(value);
        return fail_ossl(err, err_len, "cannot build subject alternative name");
    }
    GENERAL_NAME_set0_value(gn, type, value);
    if (sk_GENERAL_NAME_push(gens, gn) <= 0) {
        GENERAL_NAME_free(gn);
        return fail_ossl(err, err_len, "cannot build subject alternative name");
    }
    return 0;
}

// Adds subjectAltName = DNS:<common_name> plus each comma-separated entry of `sans`.
static int add_sans(X509 *x, const char *common_name, const char *sans, char *err,
                    size_t err_len) {
    GENERAL_NAMES *gens = sk_GENERAL_NAME_new_null();
    if (gens == NULL) return fail_ossl(err, err_len, "cannot build subject alternative names");
    int rc = 0;
    // The common name is always a DNS name, even when it looks like an address.
    size_t cn_len = strlen(common_name);
    for (size_t i = 0; i < cn_len && rc == 0; i++) {
        if (!is_dns_char((unsigned char)common_name[i])) {
            set_err(err, err_len,
                    "invalid common name '%s': it is also used as a DNS name, which may contain "
                    "only letters, digits, '-', '.', '_' and '*'",
                    common_name);
            rc = -1;
        }
    }
    if (rc == 0 && cn_len > SAN_MAX_LEN) {
        set_err(err, err_len, "common name is longer than %d characters", SAN_MAX_LEN);
        rc = -1;
    }
    if (rc == 0) {
        GENERAL_NAME *gn = GENERAL_NAME_new();
        ASN1_IA5STRING *value = ASN1_IA5STRING_new();
        if (gn == NULL || value == NULL ||
            ASN1_STRING_set(value, common_name, (int)cn_len) != 1) {
            GENERAL_NAME_free(gn);
            ASN1_IA5STRING_free(value);
            rc = fail_ossl(err, err_len, "cannot build subject alternative name");
        } else {
            GENERAL_NAME_set0_value(gn, GEN_DNS, value);
            if (sk_GENERAL_NAME_push(gens, gn) <= 0) {
                GENERAL_NAME_free(gn);
                rc = fail_ossl(err, err_len, "cannot build subject alternative name");
            }
        }
    }
    for (const char *p = sans != NULL ? sans : ""; rc == 0 && *p != '\0';) {
        const char *end = strchr(p, ',');
        if (end == NULL) end = p + strlen(p);
        const char *b = p, *e = end;
        while (b < e && (*b == ' ' || *b == '\t')) b++;
        while (e > b && (e[-1] == ' ' || e[-1] == '\t')) e--;
        if (e > b) rc = san_add(gens, b, (size_t)(e - b), err, err_len);
        p = *end == ',' ? end + 1 : end;
    }
    if (rc == 0 && X509_add1_ext_i2d(x, NID_subject_alt_name, gens, 0, X509V3_ADD_DEFAULT) != 1)
        rc = fail_ossl(err, err_len, "cannot add subjectAltName extension");
    GENERAL_NAMES_free(gens);
    return rc;
}

// ---------------------------------------------------------------------------------------------
// Files

// Whether `a` and `b` name the same file (same string, or same existing inode).
static int same_file(const char *a, const char *b) {
    if (strcmp(a, b) == 0) return 1;
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
           sa.st_ino == sb.st_ino;
}

// Writes `cert` (when non-NULL) or `key` as PEM to `path`, created or truncated with `mode`.
// A key file is also forced to `mode` if it already existed with wider permissions. `*opened`
// tells whether the file was created or truncated, even on failure.
static int write_pem(const char *path, mode_t mode, X509 *cert, EVP_PKEY *key, int *opened,
                     char *err, size_t err_len) {
    *opened = 0;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0) {
        set_err(err, err_len, "cannot write %s: %s", path, strerror(errno));
        return -1;
    }
    *opened = 1;
    if (key != NULL && fchmod(fd, mode) != 0) {
        set_err(err, err_len, "cannot restrict %s to mode %04o: %s", path, (unsigned)mode,
                strerror(errno));
        close(fd);
        return -1;
    }
    FILE *fp = fdopen(fd, "w");
    if (fp == NULL) {
        set_err(err, err_len, "cannot write %s: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    int ok = cert != NULL ? PEM_write_X509(fp, cert) == 1
                          : PEM_write_PrivateKey(fp, key, NULL, NULL, 0, NULL, NULL) == 1;
    if (!ok) {
        char what[600];
        snprintf(what, sizeof what, "cannot write %s", path);
        fclose(fp);
        return fail_ossl(err, err_len, what);
    }
    errno = 0;
    if (fflush(fp) != 0 || ferror(fp)) {
        set_err(err, err_len, "cannot write %s: %s", path,
                strerror(errno != 0 ? errno : EIO));
        fclose(fp);
        return -1;
    }
    if (fclose(fp) != 0) {
        set_err(err, err_len, "cannot write %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

// Writes the key (0600) then the certificate (0644). If either fails, the files this call
// created or truncated are removed, so that no half-written or mismatched pair is left behind; a
// file that could not be opened at all is left alone.
static int write_pair(X509 *cert, EVP_PKEY *key, const char *cert_path, const char *key_path,
                      char *err, size_t err_len) {
    int opened;
    if (write_pem(key_path, 0600, NULL, key, &opened, err, err_len) != 0) {
        if (opened) unlink(key_path);
        return -1;
    }
    if (write_pem(cert_path, 0644, cert, NULL, &opened, err, err_len) != 0) {
        if (opened) unlink(cert_path);
        unlink(key_path);
        return -1;
    }
    return 0;
}

// Passphrase callback that refuses, so an encrypted key never prompts on the terminal.
static int no_passphrase(char *buf, int size, int rwflag, void *u) {
    (void)buf;
    (void)size;
    (void)rwflag;
    *(int *)u = 1;
    return -1;
}

// Loads the CA certificate and key and checks that they belong together and form a CA.
static int load_ca(const char *cert_path, const char *key_path, X509 **cert_out,
                   EVP_PKEY **key_out, char *err, size_t err_len) {
    char what[600];
    FILE *fp = fopen(cert_path, "r");
    if (fp == NULL) {
        set_err(err, err_len, "cannot read CA certificate %s: %s", cert_path, strerror(errno));
        return -1;
    }
    X509 *cert = PEM_read_X509(fp, NULL, NULL, NULL);
    fclose(fp);
    if (cert == NULL) {
        snprintf(what, sizeof what, "cannot load CA certificate %s: not a PEM certificate",
                 cert_path);
        return fail_ossl(err, err_len, what);
    }
    fp = fopen(key_path, "r");
    if (fp == NULL) {
        set_err(err, err_len, "cannot read CA key %s: %s", key_path, strerror(errno));
        X509_free(cert);
        return -1;
    }
    int asked = 0;
    EVP_PKEY *key = PEM_read_PrivateKey(fp, NULL, no_passphrase, &asked);
    fclose(fp);
    if (key == NULL) {
        X509_free(cert);
        if (asked) {
            ERR_clear_error();
            set_err(err, err_len,
                    "cannot load CA key %s: it is encrypted, and passphrase-protected keys are "
                    "not supported",
                    key_path);
            return -1;
        }
        snprintf(what, sizeof what, "cannot load CA key %s: not a PEM private key", key_path);
        return fail_ossl(err, err_len, what);
    }
    if (X509_check_private_key(cert, key) != 1) {
        ERR_clear_error();
        set_err(err, err_len, "CA key %s does not match CA certificate %s", key_path, cert_path);
        X509_free(cert);
        EVP_PKEY_free(key);
        return -1;
    }
    if (X509_check_ca(cert) == 0) {
        ERR_clear_error();
        set_err(err, err_len, "%s is not a CA certificate", cert_path);
        X509_free(cert);
        EVP_PKEY_free(key);
        return -1;
    }
    *cert_out = cert;
    *key_out = key;
    return 0;
}

static int check_args(const char *common_name, const char *cert_path, const char *key_path,
                      char *err, size_t err_len) {
    if (common_name == NULL || common_name[0] == '\0') {
        set_err(err, err_len, "common name must not be empty");
        return -1;
    }
    if (cert_path == NULL || cert_path[0] == '\0' || key_path == NULL || key_path[0] == '\0') {
        set_err(err, err_len, "certificate and key paths must not be empty");
        return -1;
    }
    if (same_file(cert_path, key_path)) {
        set_err(err, err_len, "certificate and key must be written to different files (%s)",
                cert_path);
        return -1;
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Public API

int ctandem_cert_make_ca(const char *common_name, int days, const char *cert_path,
                         const char *key_path, char *err, size_t err_len) {
    set_err(err, err_len, "%s", "");
    if (check_args(common_name, cert_path, key_path, err, err_len) != 0) return -1;
    if (days < 1 || days > CERT_MAX_DAYS) {
        set_err(err, err_len, "CA validity must be between 1 and %d days, not %d", CERT_MAX_DAYS,
                days);
        return -1;
    }
    ERR_clear_error();

    int rc = -1;
    EVP_PKEY *key = NULL;
    X509 *x = NULL;

    key = new_p256_key();
    if (key == NULL) {
        fail_ossl(err, err_len, "cannot generate EC P-256 key");
        goto out;
    }
    x = X509_new();
    if (x == NULL || X509_set_version(x, X509_VERSION_3) != 1 || !set_random_serial(x) ||
        !set_validity(x, 0, 3600, days) || X509_set_pubkey(x, key) != 1) {
        fail_ossl(err, err_len, "cannot build CA certificate");
        goto out;
    }
    if (!set_subject(x, common_name, 1)) {
        fail_ossl(err, err_len, "invalid common name (at most 64 characters)");
        goto out;
    }
    X509V3_CTX ctx;
    X509V3_set_ctx(&ctx, x, x, NULL, NULL, 0);
    if (!add_ext(x, &ctx, NID_basic_constraints, "critical,CA:TRUE") ||
        !add_ext(x, &ctx, NID_key_usage, "critical,keyCertSign,cRLSign") ||
        !add_ext(x, &ctx, NID_subject_key_identifier, "hash")) {
        fail_ossl(err, err_len, "cannot add CA certificate extensions");
        goto out;
    }
    if (X509_sign(x, key, EVP_sha256()) <= 0) {
        fail_ossl(err, err_len, "cannot sign CA certificate");
        goto out;
    }
    if (write_pair(x, key, cert_path, key_path, err, err_len) != 0) goto out;
    rc = 0;

out:
    X509_free(x);
    EVP_PKEY_free(key);
    ERR_clear_error();
    return rc;
}

int ctandem_cert_make_signed(const char *common_name, const char *sans, int days_valid,
                             const char *ca_cert_path, const char *ca_key_path,
                             const char *cert_path, const char *key_path, char *err,
                             size_t err_len) {
    set_err(err, err_len, "%s", "");
    if (check_args(common_name, cert_path, key_path, err, err_len) != 0) return -1;
    if (ca_cert_path == NULL || ca_cert_path[0] == '\0' || ca_key_path == NULL ||
        ca_key_path[0] == '\0') {
        set_err(err, err_len, "CA certificate and key paths must not be empty");
        return -1;
    }
    if (days_valid < -CERT_MAX_DAYS / 2 || days_valid > CERT_MAX_DAYS) {
        set_err(err, err_len, "validity must be between %d and %d days, not %d",
                -CERT_MAX_DAYS / 2, CERT_MAX_DAYS, days_valid);
        return -1;
    }
    // Never overwrite the CA with the certificate being issued.
    const char *outs[2] = {cert_path, key_path}, *cas[2] = {ca_cert_path, ca_key_path};
    for (int i = 0; i < 2; i++) {
        for (int j = 0; j < 2; j++) {
            if (same_file(outs[i], cas[j])) {
                set_err(err, err_len, "refusing to overwrite the CA's file %s", cas[j]);
                return -1;
            }
        }
    }
    ERR_clear_error();

    int rc = -1;
    X509 *ca = NULL, *x = NULL;
    EVP_PKEY *ca_key = NULL, *key = NULL;

    if (load_ca(ca_cert_path, ca_key_path, &ca, &ca_key, err, err_len) != 0) goto out;
    key = new_p256_key();
    if (key == NULL) {
        fail_ossl(err, err_len, "cannot generate EC P-256 key");
        goto out;
    }
    // A negative validity makes a certificate that expired |days_valid| days ago, after having
    // been valid for as long.
    x = X509_new();
    if (x == NULL ||
        !(days_valid >= 0 ? set_validity(x, 0, 3600, days_valid)
                          : set_validity(x, -2 * days_valid, 0, days_valid)) ||
        X509_set_version(x, X509_VERSION_3) != 1 ||
        !set_random_serial(x) || X509_set_pubkey(x, key) != 1 ||
        X509_set_issuer_name(x, X509_get_subject_name(ca)) != 1) {
        fail_ossl(err, err_len, "cannot build certificate");
        goto out;
    }
    if (!set_subject(x, common_name, 0)) {
        fail_ossl(err, err_len, "invalid common name (at most 64 characters)");
        goto out;
    }
    // authorityKeyIdentifier is the CA's key identifier; "issuer" only takes effect for a CA
    // certificate without a subjectKeyIdentifier (not one of ours), where OpenSSL 3 would
    // otherwise fail with "unable to get issuer keyid".
    X509V3_CTX ctx;
    X509V3_set_ctx(&ctx, ca, x, NULL, NULL, 0);
    if (!add_ext(x, &ctx, NID_basic_constraints, "critical,CA:FALSE") ||
        !add_ext(x, &ctx, NID_key_usage, "critical,digitalSignature,keyEncipherment") ||
        !add_ext(x, &ctx, NID_ext_key_usage, "serverAuth,clientAuth") ||
        !add_ext(x, &ctx, NID_subject_key_identifier, "hash") ||
        !add_ext(x, &ctx, NID_authority_key_identifier, "keyid,issuer")) {
        fail_ossl(err, err_len, "cannot add certificate extensions");
        goto out;
    }
    if (add_sans(x, common_name, sans, err, err_len) != 0) goto out;
    if (X509_sign(x, ca_key, EVP_sha256()) <= 0) {
        fail_ossl(err, err_len, "cannot sign certificate with the CA key");
        goto out;
    }
    if (write_pair(x, key, cert_path, key_path, err, err_len) != 0) goto out;
    rc = 0;

out:
    X509_free(x);
    X509_free(ca);
    EVP_PKEY_free(key);
    EVP_PKEY_free(ca_key);
    ERR_clear_error();
    return rc;
}
