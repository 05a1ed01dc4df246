// CRC-32C with the CPU's own instruction (SSE 4.2 on x86-64), for TandemCore's CRC32C.
// Pure computation: no I/O, no state.
#ifndef CTANDEM_CRC_H
#define CTANDEM_CRC_H
#include <stddef.h>
#include <stdint.h>

/// 1 when this CPU has a CRC-32C instruction `ctandem_crc32c_update` uses, else 0.
int ctandem_crc32c_hardware(void);
/// Folds `len` bytes into the (inverted) CRC-32C register. Only call when hardware is 1.
uint32_t ctandem_crc32c_update(uint32_t reg, const void *data, size_t len);
#endif
