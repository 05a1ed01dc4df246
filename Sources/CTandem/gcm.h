// AES-GCM (128 and 256-bit keys, 96-bit nonces) with VAES and VPCLMULQDQ on 512-bit registers,
// for the TLS 1.3 record layer in tls.c. OpenSSL 3.0's AES-GCM (AES-NI, 128-bit registers) ran
// at 3.9 GB/s per core here and was the largest cost of a replicated write. Private to CTandem.
#ifndef CTANDEM_GCM_H
#define CTANDEM_GCM_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    // Round keys (11 or 15), then H^16 .. H^1 byte-reflected for GHASH (loaded unaligned).
    unsigned char round_keys[15][16];
    unsigned char h_powers[16][16];
    int rounds;
} gcm_key;

// Whether this CPU runs the code below (AES-NI, PCLMULQDQ, AVX-512 F/BW/VL, VAES, VPCLMULQDQ).
int gcm_supported(void);
// Expands `key` (16 or 32 bytes). Returns 0 for another length.
int gcm_key_init(gcm_key *k, const unsigned char *key, size_t key_len);
void gcm_key_wipe(gcm_key *k);
// Encrypts `len` bytes of `in` followed by `extra_len` (0 or 1) bytes of `extra` to `out`
// (len + extra_len bytes), authenticating `aad` too; writes the 16-byte tag.
void gcm_seal(const gcm_key *k, const unsigned char iv[12], const unsigned char *aad, size_t aad_len,
              const unsigned char *in, size_t len, const unsigned char *extra, size_t extra_len,
              unsigned char *out, unsigned char tag[16]);
// Decrypts `len` bytes of `in` to `out` if `tag` is right; returns 1 then, else 0 (and `out`
// holds plaintext that must not be used).
int gcm_open(const gcm_key *k, const unsigned char iv[12], const unsigned char *aad, size_t aad_len,
             const unsigned char *in, size_t len, unsigned char *out, const unsigned char tag[16]);

#endif
