/*
 * The BLAKE3 tree below the root, for the disk kind's block digests.
 *
 * blake3 hashes its input as a binary tree of 1 KiB chunks.  A block of the
 * disk kind (1 MiB) is a whole number of aligned subtrees ("leaves", 4 KiB
 * for instance), so the blake3 digest of a block is the root over the
 * chaining values of its leaves.  Keeping those chaining values, a block of
 * which one leaf changed costs one leaf to hash and a few parent nodes, not
 * the whole block, and the digest is exactly blake3's (the BLAKE3
 * specification, section 2: chunks, parent nodes, the ROOT flag).
 *
 * leaves(data, counter, leafChunks) -> bytes: the chaining value (32 bytes)
 *     of every leaf of leafChunks chunks (a power of two) in data, a whole
 *     number of leaves whose first chunk has the chunk counter ``counter``
 *     within its block;
 * root(values) -> bytes: the blake3 digest of a block whose leaves have the
 *     chaining values ``values`` (two or more, a power of two).
 *
 * Chunks, and parent nodes of one level, are hashed several at a time, one
 * per vector lane; the GIL is released while hashing.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "little-endian hosts only (the install then goes on without this module)"
#endif

/* One build per instruction set on x86-64, chosen when the module loads. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#define LANES 16
#define CHUNK 1024
#define CHUNK_START 1
#define CHUNK_END 2
#define PARENT 4
#define ROOT 8

typedef uint32_t vec __attribute__((vector_size(4 * LANES)));

static const uint32_t IV[8] = {
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
    0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
};

/* The message word each round takes where round 0 takes word i. */
static const uint8_t SCHEDULE[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

static inline __attribute__((always_inline)) vec splat(uint32_t x)
{
    vec v;
    for (int l = 0; l < LANES; l++)
        v[l] = x;
    return v;
}

static inline __attribute__((always_inline)) vec rotr(vec x, int n)
{
    return (x >> n) | (x << (32 - n));
}

static inline __attribute__((always_inline)) uint32_t load32(const uint8_t *p)
{
    uint32_t x;
    memcpy(&x, p, 4); /* little-endian hosts (x86, arm64) */
    return x;
}

#define G(a, b, c, d, x, y)         \
    do {                            \
        a = a + b + (x);            \
        d = rotr(d ^ a, 16);        \
        c = c + d;                  \
        b = rotr(b ^ c, 12);        \
        a = a + b + (y);            \
        d = rotr(d ^ a, 8);         \
        c = c + d;                  \
        b = rotr(b ^ c, 7);         \
    } while (0)

/* One compression in every lane: cv = compress(cv, block of each lane). */
static inline __attribute__((always_inline)) void compress(
    vec cv[8], const uint8_t *const block[LANES], vec lo, vec hi, uint32_t flags)
{
    vec m[16];
    for (int w = 0; w < 16; w++)
        for (int l = 0; l < LANES; l++)
            m[w][l] = load32(block[l] + 4 * w);
    vec s0 = cv[0], s1 = cv[1], s2 = cv[2], s3 = cv[3];
    vec s4 = cv[4], s5 = cv[5], s6 = cv[6], s7 = cv[7];
    vec s8 = splat(IV[0]), s9 = splat(IV[1]), s10 = splat(IV[2]), s11 = splat(IV[3]);
    vec s12 = lo, s13 = hi, s14 = splat(64), s15 = splat(flags);
    for (int r = 0; r < 7; r++) {
        const uint8_t *k = SCHEDULE[r];
        G(s0, s4, s8, s12, m[k[0]], m[k[1]]);
        G(s1, s5, s9, s13, m[k[2]], m[k[3]]);
        G(s2, s6, s10, s14, m[k[4]], m[k[5]]);
        G(s3, s7, s11, s15, m[k[6]], m[k[7]]);
        G(s0, s5, s10, s15, m[k[8]], m[k[9]]);
        G(s1, s6, s11, s12, m[k[10]], m[k[11]]);
        G(s2, s7, s8, s13, m[k[12]], m[k[13]]);
        G(s3, s4, s9, s14, m[k[14]], m[k[15]]);
    }
    cv[0] = s0 ^ s8;
    cv[1] = s1 ^ s9;
    cv[2] = s2 ^ s10;
    cv[3] = s3 ^ s11;
    cv[4] = s4 ^ s12;
    cv[5] = s5 ^ s13;
    cv[6] = s6 ^ s14;
    cv[7] = s7 ^ s15;
}

/*
 * The chaining values of ``count`` inputs of ``blocks`` 64-byte blocks each,
 * ``stride`` bytes apart from ``input``: chunks (stride 1024, 16 blocks, the
 * counter counting up from ``counter``) or parent nodes (stride 64, one block,
 * counter 0).  ``out`` may be ``input`` when each output lies before its input.
 */
CLONES static void
hash_many(const uint8_t *input, size_t stride, size_t blocks, size_t count,
          uint64_t counter, int counting, uint32_t flags, uint32_t start,
          uint32_t end, uint8_t *out)
{
    for (size_t base = 0; base < count; base += LANES) {
        const uint8_t *lane[LANES];
        vec lo, hi, cv[8];
        for (int l = 0; l < LANES; l++) {
            size_t index = base + l < count ? base + l : count - 1;
            uint64_t c = counter + (counting ? index : 0);
            lane[l] = input + index * stride;
            lo[l] = (uint32_t)c;
            hi[l] = (uint32_t)(c >> 32);
        }
        for (int i = 0; i < 8; i++)
            cv[i] = splat(IV[i]);
        for (size_t b = 0; b < blocks; b++) {
            const uint8_t *block[LANES];
            uint32_t f = flags | (b == 0 ? start : 0) | (b + 1 == blocks ? end : 0);
            for (int l = 0; l < LANES; l++)
                block[l] = lane[l] + 64 * b;
            compress(cv, block, lo, hi, f);
        }
        for (int l = 0; l < LANES && base + l < count; l++)
            for (int i = 0; i < 8; i++)
                memcpy(out + 32 * (base + l) + 4 * i, &cv[i][l], 4);
    }
}

static int power_of_two(Py_ssize_t n) { return n > 0 && (n & (n - 1)) == 0; }

static PyObject *leaves(PyObject *self, PyObject *args)
{
    Py_buffer data;
    unsigned long long counter;
    Py_ssize_t leafChunks;
    if (!PyArg_ParseTuple(args, "y*Kn", &data, &counter, &leafChunks))
        return NULL;
    Py_ssize_t chunks = data.len / CHUNK;
    if (!power_of_two(leafChunks) || data.len % (CHUNK * leafChunks) != 0 ||
        counter % leafChunks != 0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError,
                        "leaves: the data must be whole leaves of a power of two "
                        "chunks, at a counter that is a multiple of it");
        return NULL;
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, 32 * (chunks / leafChunks));
    uint8_t *values = chunks ? malloc(32 * chunks) : NULL;
    if (result == NULL || (chunks && values == NULL)) {
        PyBuffer_Release(&data);
        Py_XDECREF(result);
        free(values);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    if (chunks) {
        hash_many(data.buf, CHUNK, CHUNK / 64, chunks, counter, 1, 0,
                  CHUNK_START, CHUNK_END, values);
        for (Py_ssize_t n = chunks; n > chunks / leafChunks; n /= 2)
            hash_many(values, 64, 1, n / 2, 0, 0, PARENT, 0, 0, values);
        memcpy(PyBytes_AS_STRING(result), values, 32 * (chunks / leafChunks));
    }
    Py_END_ALLOW_THREADS
    free(values);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *root(PyObject *self, PyObject *args)
{
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*", &data))
        return NULL;
    Py_ssize_t n = data.len / 32;
    if (data.len % 32 != 0 || n < 2 || !power_of_two(n)) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError,
                        "root: two or more chaining values (a power of two) needed");
        return NULL;
    }
    uint8_t *values = malloc(data.len);
    if (values == NULL) {
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    uint8_t digest[32];
    Py_BEGIN_ALLOW_THREADS
    memcpy(values, data.buf, data.len);
    for (; n > 2; n /= 2)
        hash_many(values, 64, 1, n / 2, 0, 0, PARENT, 0, 0, values);
    hash_many(values, 64, 1, 1, 0, 0, PARENT | ROOT, 0, 0, digest);
    Py_END_ALLOW_THREADS
    free(values);
    PyBuffer_Release(&data);
    return PyBytes_FromStringAndSize((const char *)digest, 32);
}

static PyMethodDef methods[] = {
    {"leaves", leaves, METH_VARARGS,
     "leaves(data, counter, leafChunks) -> the chaining values of data's leaves"},
    {"root", root, METH_VARARGS,
     "root(values) -> the blake3 digest of a block from its leaves' values"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_leafhash",
    "The BLAKE3 tree below the root: leaves' chaining values, and the root.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__leafhash(void) { return PyModule_Create(&module); }
