#include "ctandem_crc.h"
#include <string.h>

#if defined(__x86_64__)
#include <nmmintrin.h>

int ctandem_crc32c_hardware(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") ? 1 : 0;
}

__attribute__((target("sse4.2"))) uint32_t ctandem_crc32c_update(uint32_t reg, const void *data, size_t len) {
    const unsigned char *p = data;
    uint64_t crc = reg;
    while (len >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        crc = _mm_crc32_u64(crc, word);
        p += 8;
        len -= 8;
    }
    uint32_t c = (uint32_t)crc;
    while (len--) c = _mm_crc32_u8(c, *p++);
    return c;
}
#else
int ctandem_crc32c_hardware(void) { return 0; }
uint32_t ctandem_crc32c_update(uint32_t reg, const void *data, size_t len) {
    (void)data;
    (void)len;
    return reg;
}
#endif
