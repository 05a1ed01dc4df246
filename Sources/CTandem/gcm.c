// AES-GCM with VAES and VPCLMULQDQ (see gcm.h). Sixteen blocks per round: the counter blocks go
// through AES four to a 512-bit register, four registers interleaved to hide the AES latency,
// and GHASH multiplies the sixteen ciphertext blocks by H^16 .. H^1 at once and reduces once.
// GHASH works on byte-reflected blocks as in Intel's "Carry-Less Multiplication Instruction and
// its Usage for Computing the GCM Mode" (Gueron and Kounavis), algorithm 5. Every output is
// checked against OpenSSL's AES-GCM in TLSSessionTests (random keys, nonces and lengths).
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gcm.h"

#define GCM_TARGET \
    __attribute__((target("aes,pclmul,sse4.1,ssse3,avx2,avx512f,avx512bw,avx512vl,vaes,vpclmulqdq")))

int gcm_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("aes") && __builtin_cpu_supports("pclmul") &&
           __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("vaes") &&
           __builtin_cpu_supports("vpclmulqdq");
}

GCM_TARGET static inline __m128i bswap128(__m128i x) {
    return _mm_shuffle_epi8(x, _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

GCM_TARGET static inline __m512i bswap512(__m512i x) {
    const __m512i mask = _mm512_broadcast_i32x4(_mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    return _mm512_shuffle_epi8(x, mask);
}

// MARK: Key expansion (Intel's AES-NI white paper)

GCM_TARGET static __m128i assist128(__m128i t1, __m128i t2) {
    t2 = _mm_shuffle_epi32(t2, 0xff);
    __m128i t3 = _mm_slli_si128(t1, 4);
    t1 = _mm_xor_si128(t1, t3);
    t3 = _mm_slli_si128(t3, 4);
    t1 = _mm_xor_si128(t1, t3);
    t3 = _mm_slli_si128(t3, 4);
    t1 = _mm_xor_si128(t1, t3);
    return _mm_xor_si128(t1, t2);
}

GCM_TARGET static void assist256_1(__m128i *t1, __m128i t2) {
    t2 = _mm_shuffle_epi32(t2, 0xff);
    __m128i t4 = _mm_slli_si128(*t1, 4);
    *t1 = _mm_xor_si128(*t1, t4);
    t4 = _mm_slli_si128(t4, 4);
    *t1 = _mm_xor_si128(*t1, t4);
    t4 = _mm_slli_si128(t4, 4);
    *t1 = _mm_xor_si128(*t1, t4);
    *t1 = _mm_xor_si128(*t1, t2);
}

GCM_TARGET static void assist256_2(__m128i t1, __m128i *t3) {
    __m128i t2 = _mm_shuffle_epi32(_mm_aeskeygenassist_si128(t1, 0), 0xaa);
    __m128i t4 = _mm_slli_si128(*t3, 4);
    *t3 = _mm_xor_si128(*t3, t4);
    t4 = _mm_slli_si128(t4, 4);
    *t3 = _mm_xor_si128(*t3, t4);
    t4 = _mm_slli_si128(t4, 4);
    *t3 = _mm_xor_si128(*t3, t4);
    *t3 = _mm_xor_si128(*t3, t2);
}

GCM_TARGET static void expand128(__m128i rk[11], const unsigned char *key) {
    rk[0] = _mm_loadu_si128((const __m128i *)key);
#define STEP(i, rcon) rk[i] = assist128(rk[i - 1], _mm_aeskeygenassist_si128(rk[i - 1], rcon))
    STEP(1, 0x01); STEP(2, 0x02); STEP(3, 0x04); STEP(4, 0x08); STEP(5, 0x10);
    STEP(6, 0x20); STEP(7, 0x40); STEP(8, 0x80); STEP(9, 0x1b); STEP(10, 0x36);
#undef STEP
}

GCM_TARGET static void expand256(__m128i rk[15], const unsigned char *key) {
    __m128i t1 = _mm_loadu_si128((const __m128i *)key), t3 = _mm_loadu_si128((const __m128i *)(key + 16));
    rk[0] = t1;
    rk[1] = t3;
#define STEP(i, rcon)                                              \
    assist256_1(&t1, _mm_aeskeygenassist_si128(t3, rcon));        \
    rk[i] = t1;                                                    \
    if (i < 14) {                                                  \
        assist256_2(t1, &t3);                                      \
        rk[i + 1] = t3;                                            \
    }
    STEP(2, 0x01) STEP(4, 0x02) STEP(6, 0x04) STEP(8, 0x08) STEP(10, 0x10) STEP(12, 0x20) STEP(14, 0x40)
#undef STEP
}

GCM_TARGET static inline __m128i aes_block(const gcm_key *k, __m128i x) {
    const __m128i *rk = (const __m128i *)k->round_keys;
    x = _mm_xor_si128(x, _mm_loadu_si128(&rk[0]));
    for (int i = 1; i < k->rounds; i++) x = _mm_aesenc_si128(x, _mm_loadu_si128(&rk[i]));
    return _mm_aesenclast_si128(x, _mm_loadu_si128(&rk[k->rounds]));
}

// MARK: GHASH

// The 256-bit carry-less product of a and b, unreduced, as (lo, hi).
GCM_TARGET static inline void clmul128(__m128i a, __m128i b, __m128i *lo, __m128i *hi) {
    __m128i l = _mm_clmulepi64_si128(a, b, 0x00), h = _mm_clmulepi64_si128(a, b, 0x11);
    __m128i m = _mm_xor_si128(_mm_clmulepi64_si128(a, b, 0x10), _mm_clmulepi64_si128(a, b, 0x01));
    *lo = _mm_xor_si128(l, _mm_slli_si128(m, 8));
    *hi = _mm_xor_si128(h, _mm_srli_si128(m, 8));
}

// Shifts the reflected product left by one bit and reduces it modulo x^128 + x^7 + x^2 + x + 1.
GCM_TARGET static inline __m128i ghash_reduce(__m128i lo, __m128i hi) {
    __m128i t7 = _mm_srli_epi32(lo, 31), t8 = _mm_srli_epi32(hi, 31);
    lo = _mm_slli_epi32(lo, 1);
    hi = _mm_slli_epi32(hi, 1);
    __m128i t9 = _mm_srli_si128(t7, 12);
    t8 = _mm_slli_si128(t8, 4);
    t7 = _mm_slli_si128(t7, 4);
    lo = _mm_or_si128(lo, t7);
    hi = _mm_or_si128(_mm_or_si128(hi, t8), t9);
    t7 = _mm_xor_si128(_mm_xor_si128(_mm_slli_epi32(lo, 31), _mm_slli_epi32(lo, 30)), _mm_slli_epi32(lo, 25));
    t8 = _mm_srli_si128(t7, 4);
    t7 = _mm_slli_si128(t7, 12);
    lo = _mm_xor_si128(lo, t7);
    __m128i t2 = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi32(lo, 1), _mm_srli_epi32(lo, 2)), _mm_srli_epi32(lo, 7));
    t2 = _mm_xor_si128(t2, t8);
    lo = _mm_xor_si128(lo, t2);
    return _mm_xor_si128(hi, lo);
}

GCM_TARGET static inline __m128i gfmul(__m128i a, __m128i b) {
    __m128i lo, hi;
    clmul128(a, b, &lo, &hi);
    return ghash_reduce(lo, hi);
}

GCM_TARGET static inline __m128i fold_lanes(__m512i v) {
    __m256i a = _mm256_xor_si256(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
    return _mm_xor_si128(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
}

// acc <- (acc ^ X0) * H^16 ^ X1 * H^15 ^ ... ^ X15 * H, for sixteen reflected blocks in x[0..3].
GCM_TARGET static inline __m128i ghash16(const gcm_key *k, __m128i acc, __m512i x0, __m512i x1, __m512i x2, __m512i x3) {
    const __m512i *hp = (const __m512i *)k->h_powers;
    x0 = _mm512_xor_si512(x0, _mm512_zextsi128_si512(acc));
    __m512i h0 = _mm512_loadu_si512(&hp[0]), h1 = _mm512_loadu_si512(&hp[1]);
    __m512i h2 = _mm512_loadu_si512(&hp[2]), h3 = _mm512_loadu_si512(&hp[3]);
    __m512i lo = _mm512_clmulepi64_epi128(x0, h0, 0x00), hi = _mm512_clmulepi64_epi128(x0, h0, 0x11);
    __m512i mid = _mm512_xor_si512(_mm512_clmulepi64_epi128(x0, h0, 0x10), _mm512_clmulepi64_epi128(x0, h0, 0x01));
#define MUL(x, h)                                                                                  \
    lo = _mm512_xor_si512(lo, _mm512_clmulepi64_epi128(x, h, 0x00));                               \
    hi = _mm512_xor_si512(hi, _mm512_clmulepi64_epi128(x, h, 0x11));                               \
    mid = _mm512_xor_si512(mid, _mm512_xor_si512(_mm512_clmulepi64_epi128(x, h, 0x10),            \
                                                 _mm512_clmulepi64_epi128(x, h, 0x01)));
    MUL(x1, h1) MUL(x2, h2) MUL(x3, h3)
#undef MUL
    __m128i l = fold_lanes(lo), h = fold_lanes(hi), m = fold_lanes(mid);
    l = _mm_xor_si128(l, _mm_slli_si128(m, 8));
    h = _mm_xor_si128(h, _mm_srli_si128(m, 8));
    return ghash_reduce(l, h);
}

// GHASH of `len` bytes, the last block padded with zeros.
GCM_TARGET static __m128i ghash_bytes(__m128i acc, __m128i h1, const unsigned char *p, size_t len) {
    while (len >= 16) {
        acc = gfmul(_mm_xor_si128(acc, bswap128(_mm_loadu_si128((const __m128i *)p))), h1);
        p += 16;
        len -= 16;
    }
    if (len) {
        unsigned char block[16] = {0};
        memcpy(block, p, len);
        acc = gfmul(_mm_xor_si128(acc, bswap128(_mm_loadu_si128((const __m128i *)block))), h1);
    }
    return acc;
}

// MARK: Keys

GCM_TARGET int gcm_key_init(gcm_key *k, const unsigned char *key, size_t key_len) {
    __m128i rk[15];
    if (key_len == 16) {
        expand128(rk, key);
        k->rounds = 10;
    } else if (key_len == 32) {
        expand256(rk, key);
        k->rounds = 14;
    } else {
        return 0;
    }
    for (int i = 0; i <= k->rounds; i++) _mm_storeu_si128((__m128i *)k->round_keys[i], rk[i]);
    __m128i h = bswap128(aes_block(k, _mm_setzero_si128())), p = h;
    for (int i = 15; i >= 0; i--) {  // h_powers[15] = H, h_powers[0] = H^16
        _mm_storeu_si128((__m128i *)k->h_powers[i], p);
        p = gfmul(p, h);
    }
    memset(rk, 0, sizeof(rk));
    return 1;
}

void gcm_key_wipe(gcm_key *k) {
    volatile unsigned char *p = (volatile unsigned char *)k;
    for (size_t i = 0; i < sizeof(*k); i++) p[i] = 0;
}

// MARK: Seal and open

// The counter block with value `n`, from the byte-reflected J0 (value 1).
GCM_TARGET static inline __m128i counter_block(__m128i base, uint32_t n) {
    return bswap128(_mm_add_epi32(base, _mm_cvtsi32_si128((int)(n - 1))));
}

GCM_TARGET static void gcm_crypt(const gcm_key *k, const unsigned char iv[12], const unsigned char *aad, size_t aad_len,
                                 const unsigned char *in, size_t len, const unsigned char *extra, size_t extra_len,
                                 unsigned char *out, int encrypt, unsigned char tag[16]) {
    unsigned char j0[16];
    memcpy(j0, iv, 12);
    j0[12] = 0, j0[13] = 0, j0[14] = 0, j0[15] = 1;
    __m128i j0_block = _mm_loadu_si128((const __m128i *)j0);
    __m128i base = bswap128(j0_block);
    __m512i base512 = _mm512_broadcast_i32x4(base);
    __m128i h1 = _mm_loadu_si128((const __m128i *)k->h_powers[15]);
    __m128i acc = ghash_bytes(_mm_setzero_si128(), h1, aad, aad_len);
    uint32_t n = 2;
    size_t done = 0;
    if (len >= 256) {
        // Sixteen blocks per round. The round keys stay in registers, and the counters are kept
        // byte-reflected, four to a register, and stepped by 16 (building them from `n` on each
        // round, and loading the keys inside it, cost a fifth of the speed).
        __m512i rk[15];
        for (int i = 0; i <= k->rounds; i++) rk[i] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)k->round_keys[i]));
        const __m512i four = _mm512_set_epi32(0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, 4);
        const __m512i sixteen = _mm512_slli_epi32(four, 2);
        // Counter values 2..5, 6..9, 10..13 and 14..17 (J0, value 1, is kept for the tag).
        __m512i q0 = _mm512_add_epi32(base512, _mm512_set_epi32(0, 0, 0, 4, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 1));
        __m512i q1 = _mm512_add_epi32(q0, four), q2 = _mm512_add_epi32(q1, four), q3 = _mm512_add_epi32(q2, four);
        while (len - done >= 256) {
            __m512i e0 = _mm512_xor_si512(bswap512(q0), rk[0]), e1 = _mm512_xor_si512(bswap512(q1), rk[0]);
            __m512i e2 = _mm512_xor_si512(bswap512(q2), rk[0]), e3 = _mm512_xor_si512(bswap512(q3), rk[0]);
            q0 = _mm512_add_epi32(q0, sixteen), q1 = _mm512_add_epi32(q1, sixteen);
            q2 = _mm512_add_epi32(q2, sixteen), q3 = _mm512_add_epi32(q3, sixteen);
            for (int i = 1; i < k->rounds; i++) {
                e0 = _mm512_aesenc_epi128(e0, rk[i]), e1 = _mm512_aesenc_epi128(e1, rk[i]);
                e2 = _mm512_aesenc_epi128(e2, rk[i]), e3 = _mm512_aesenc_epi128(e3, rk[i]);
            }
            e0 = _mm512_aesenclast_epi128(e0, rk[k->rounds]), e1 = _mm512_aesenclast_epi128(e1, rk[k->rounds]);
            e2 = _mm512_aesenclast_epi128(e2, rk[k->rounds]), e3 = _mm512_aesenclast_epi128(e3, rk[k->rounds]);
            const __m512i *src = (const __m512i *)(in + done);
            __m512i d0 = _mm512_loadu_si512(&src[0]), d1 = _mm512_loadu_si512(&src[1]);
            __m512i d2 = _mm512_loadu_si512(&src[2]), d3 = _mm512_loadu_si512(&src[3]);
            __m512i c0 = _mm512_xor_si512(d0, e0), c1 = _mm512_xor_si512(d1, e1);
            __m512i c2 = _mm512_xor_si512(d2, e2), c3 = _mm512_xor_si512(d3, e3);
            __m512i *dst = (__m512i *)(out + done);
            _mm512_storeu_si512(&dst[0], c0);
            _mm512_storeu_si512(&dst[1], c1);
            _mm512_storeu_si512(&dst[2], c2);
            _mm512_storeu_si512(&dst[3], c3);
            if (encrypt) acc = ghash16(k, acc, bswap512(c0), bswap512(c1), bswap512(c2), bswap512(c3));
            else acc = ghash16(k, acc, bswap512(d0), bswap512(d1), bswap512(d2), bswap512(d3));
            n += 16;
            done += 256;
        }
    }
    while (len - done >= 16) {
        __m128i d = _mm_loadu_si128((const __m128i *)(in + done));
        __m128i c = _mm_xor_si128(d, aes_block(k, counter_block(base, n)));
        _mm_storeu_si128((__m128i *)(out + done), c);
        acc = gfmul(_mm_xor_si128(acc, bswap128(encrypt ? c : d)), h1);
        n++;
        done += 16;
    }
    size_t tail = len - done, last = tail + extra_len;  // at most 16
    if (last) {
        unsigned char block[16] = {0}, cipher[16] = {0};
        memcpy(block, in + done, tail);
        if (extra_len) memcpy(block + tail, extra, extra_len);
        __m128i d = _mm_loadu_si128((const __m128i *)block);
        _mm_storeu_si128((__m128i *)block, _mm_xor_si128(d, aes_block(k, counter_block(base, n))));
        // GHASH takes the ciphertext padded with zeros (read before `out`, which may be `in`).
        memcpy(cipher, encrypt ? block : in + done, last);
        memcpy(out + done, block, last);
        acc = gfmul(_mm_xor_si128(acc, bswap128(_mm_loadu_si128((const __m128i *)cipher))), h1);
    }
    unsigned char lengths[16];
    uint64_t abits = (uint64_t)aad_len * 8, cbits = (uint64_t)(len + extra_len) * 8;
    for (int i = 0; i < 8; i++) {
        lengths[i] = (unsigned char)(abits >> (56 - 8 * i));
        lengths[8 + i] = (unsigned char)(cbits >> (56 - 8 * i));
    }
    acc = gfmul(_mm_xor_si128(acc, bswap128(_mm_loadu_si128((const __m128i *)lengths))), h1);
    _mm_storeu_si128((__m128i *)tag, _mm_xor_si128(bswap128(acc), aes_block(k, j0_block)));
}

void gcm_seal(const gcm_key *k, const unsigned char iv[12], const unsigned char *aad, size_t aad_len,
              const unsigned char *in, size_t len, const unsigned char *extra, size_t extra_len,
              unsigned char *out, unsigned char tag[16]) {
    gcm_crypt(k, iv, aad, aad_len, in, len, extra, extra_len, out, 1, tag);
}

int gcm_open(const gcm_key *k, const unsigned char iv[12], const unsigned char *aad, size_t aad_len,
             const unsigned char *in, size_t len, unsigned char *out, const unsigned char tag[16]) {
    unsigned char mine[16];
    gcm_crypt(k, iv, aad, aad_len, in, len, NULL, 0, out, 0, mine);
    unsigned char diff = 0;
    for (int i = 0; i < 16; i++) diff |= (unsigned char)(mine[i] ^ tag[i]);
    return diff == 0;
}

// MARK: Check against OpenSSL (for the tests)

#include <openssl/evp.h>

static int openssl_gcm(int encrypt, size_t key_len, const unsigned char *key, const unsigned char *iv,
                       const unsigned char *aad, int aad_len, const unsigned char *in, int len,
                       unsigned char *out, unsigned char tag[16]) {
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    int n = 0, ok = c != NULL;
    ok = ok && EVP_CipherInit_ex(c, key_len == 16 ? EVP_aes_128_gcm() : EVP_aes_256_gcm(), NULL, key, iv, encrypt) == 1;
    ok = ok && EVP_CipherUpdate(c, NULL, &n, aad, aad_len) == 1;
    ok = ok && (len == 0 || EVP_CipherUpdate(c, out, &n, in, len) == 1);
    ok = ok && EVP_CipherFinal_ex(c, out + len, &n) == 1;
    ok = ok && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, 16, tag) == 1;
    EVP_CIPHER_CTX_free(c);
    return ok;
}

int ctandem_gcm_check(uint64_t seed, int cases, char *why, size_t why_len) {
    if (!gcm_supported()) return -1;
    enum { MAX = 70000 };
    unsigned char *in = malloc(MAX), *expected = malloc(MAX), *got = malloc(MAX), *back = malloc(MAX);
    int failures = 0;
    uint64_t s = seed;
#define NEXT() (s = s * 6364136223846793005ULL + 1442695040888963407ULL, (unsigned)(s >> 33))
    for (int t = 0; t < cases && in && expected && got && back; t++) {
        size_t key_len = (t & 1) ? 32 : 16;
        unsigned char key[32], iv[12], aad[40], tag1[16], tag2[16];
        for (int i = 0; i < 32; i++) key[i] = (unsigned char)NEXT();
        for (int i = 0; i < 12; i++) iv[i] = (unsigned char)NEXT();
        int aad_len = (int)(NEXT() % 40);
        for (int i = 0; i < aad_len; i++) aad[i] = (unsigned char)NEXT();
        // Every length to 600 (every tail and both loops), then any to 66000 bytes.
        size_t len = t < 600 ? (size_t)t : NEXT() % 66000, extra = NEXT() % 2;
        for (size_t i = 0; i < len + extra; i++) in[i] = (unsigned char)NEXT();
        gcm_key k;
        gcm_key_init(&k, key, key_len);
        const char *wrong = NULL;
        if (!openssl_gcm(1, key_len, key, iv, aad, aad_len, in, (int)(len + extra), expected, tag1)) wrong = "OpenSSL failed";
        if (!wrong) {
            gcm_seal(&k, iv, aad, (size_t)aad_len, in, len, in + len, extra, got, tag2);
            if (memcmp(expected, got, len + extra) != 0) wrong = "ciphertext differs from OpenSSL's";
            else if (memcmp(tag1, tag2, 16) != 0) wrong = "tag differs from OpenSSL's";
        }
        if (!wrong && (!gcm_open(&k, iv, aad, (size_t)aad_len, expected, len + extra, back, tag1) || memcmp(back, in, len + extra) != 0))
            wrong = "did not open OpenSSL's ciphertext";
        if (!wrong) {
            memcpy(back, expected, len + extra);
            if (!gcm_open(&k, iv, aad, (size_t)aad_len, back, len + extra, back, tag1) || memcmp(back, in, len + extra) != 0)
                wrong = "did not open in place";
        }
        if (!wrong && len + extra > 0) {
            size_t at = NEXT() % (len + extra);
            expected[at] ^= (unsigned char)(1u << (NEXT() % 8));
            if (gcm_open(&k, iv, aad, (size_t)aad_len, expected, len + extra, back, tag1)) wrong = "opened a tampered ciphertext";
        }
        if (!wrong) {
            tag1[NEXT() % 16] ^= 1;
            memcpy(expected, got, len + extra);
            if (gcm_open(&k, iv, aad, (size_t)aad_len, expected, len + extra, back, tag1)) wrong = "accepted a wrong tag";
        }
        gcm_key_wipe(&k);
        if (wrong && failures++ == 0)
            snprintf(why, why_len, "case %d (key %zu bytes, aad %d, length %zu + %zu): %s", t, key_len, aad_len, len, extra, wrong);
    }
#undef NEXT
    free(in), free(expected), free(got), free(back);
    return failures;
}
