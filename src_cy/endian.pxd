# Little-endian loads and stores, independent of the host's byte order and alignment.
from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef inline void put_u32(char* p, uint32_t v) noexcept nogil:
    p[0] = <char>(v & 0xFF)
    p[1] = <char>((v >> 8) & 0xFF)
    p[2] = <char>((v >> 16) & 0xFF)
    p[3] = <char>((v >> 24) & 0xFF)


cdef inline void put_u64(char* p, uint64_t v) noexcept nogil:
    cdef int k
    for k in range(8):
        p[k] = <char>((v >> (8 * k)) & 0xFF)


cdef inline uint32_t get_u32(const uint8_t* p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t get_u64(const uint8_t* p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int k
    for k in range(8):
        v |= (<uint64_t>p[k]) << (8 * k)
    return v
