/* The word n-gram hashes of decontaminate in one pass over the code points: the compiled form of
 * clinmega.data.decontam._numpy_ngrams (same hashes, same order; tests hold the two equal). Each code point
 * c is first mapped through `fold` (its NFKC + lower case where that is one context-free code point, or the
 * identity for text normalised already) and `word` (whether the result is a \w character).
 *
 * A word is a maximal run of word characters; its hash is fmix64 of the polynomial of its code points
 * (h = h * P + c, mod 2**64); an n-gram's hash is the polynomial of its n words' hashes. No n-gram spans
 * two texts (a text begins at each of text_starts) nor, with `segments`, a NUL code point. Each n-gram's
 * owner is the index of its text. Built as an optional extension: without a compiler the numpy form runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define PRIME 0x100000001B3ULL

static inline uint64_t fmix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xFF51AFD7ED558CCDULL;
    x ^= x >> 33;
    x *= 0xC4CEB9FE1A85EC53ULL;
    x ^= x >> 33;
    return x;
}

static PyObject *ngrams(PyObject *self, PyObject *args) {
    Py_buffer cps, fold, word, starts, out_hash, out_owner;
    Py_ssize_t n, itemsize;
    int segments;
    if (!PyArg_ParseTuple(args, "y*ny*y*y*npw*w*", &cps, &itemsize, &fold, &word, &starts, &n, &segments,
                          &out_hash, &out_owner))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t size = itemsize == 4 ? cps.len / 4 : cps.len;
    Py_ssize_t table = fold.len / 4, texts = starts.len / 8, capacity = out_hash.len / 8;
    if ((itemsize != 1 && itemsize != 4) || word.len != table || table < 256 || n < 1 || n > 64 ||
        out_owner.len / 8 != capacity) {
        PyErr_SetString(PyExc_ValueError, "ngrams: inconsistent buffers");
        goto done;
    }
    {
        const uint8_t *c8 = (const uint8_t *)cps.buf;
        const uint32_t *c32 = (const uint32_t *)cps.buf;
        const uint32_t *fold_of = (const uint32_t *)fold.buf;
        const uint8_t *word_of = (const uint8_t *)word.buf;
        const int64_t *text_start = (const int64_t *)starts.buf;
        uint64_t *hash = (uint64_t *)out_hash.buf;
        int64_t *owner = (int64_t *)out_owner.buf;
        uint64_t ring[64] = {0}, pn = 1, rolling = 0, h = 0;
        for (Py_ssize_t j = 0; j < n; j++) pn *= PRIME;
        Py_ssize_t next_text = 0, text = -1, in_window = 0, count = 0, slot = 0;
        Py_ssize_t next_start = texts ? text_start[0] : size + 1;
        uint64_t in_word = 0;
        for (Py_ssize_t i = 0; i <= size; i++) {
            uint64_t w = 0, c = 0;
            if (i < size) {
                uint32_t raw = itemsize == 4 ? c32[i] : c8[i];
                if (raw >= table) {
                    PyErr_Format(PyExc_ValueError, "ngrams: code point %u beyond the tables", raw);
                    goto done;
                }
                w = word_of[raw] != 0;
                c = fold_of[raw];
            }
            if (in_word & !w) { /* a word ended at i: the one branch that follows the text */
                uint64_t wh = fmix64(h);
                uint64_t old = ring[slot];
                ring[slot] = wh;
                slot = slot + 1 == n ? 0 : slot + 1; /* no division in the loop */
                rolling = rolling * PRIME + wh;
                if (in_window >= n) rolling -= old * pn;
                in_window++;
                if (in_window >= n) {
                    if (count == capacity) {
                        PyErr_SetString(PyExc_ValueError, "ngrams: output buffers too small");
                        goto done;
                    }
                    hash[count] = rolling;
                    owner[count++] = text;
                }
            }
            if (i == size) break;
            if (i >= next_start) { /* a text begins (texts are cut at a non-word character): a new window */
                while (next_text < texts && text_start[next_text] <= i) text = next_text++;
                next_start = next_text < texts ? text_start[next_text] : size + 1;
                in_window = 0;
                rolling = 0;
            }
            h = (h * PRIME * in_word + c) * w; /* c starts a word, extends one, or (w = 0) nothing */
            in_word = w;
            if (segments && c == 0 && !w) { /* a NUL cuts the window */
                in_window = 0;
                rolling = 0;
            }
        }
        result = PyLong_FromSsize_t(count);
    }
done:
    PyBuffer_Release(&cps);
    PyBuffer_Release(&fold);
    PyBuffer_Release(&word);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&out_hash);
    PyBuffer_Release(&out_owner);
    return result;
}

static PyMethodDef methods[] = {
    {"ngrams", ngrams, METH_VARARGS,
     "ngrams(cps, itemsize, fold, word, text_starts, n, segments, out_hash, out_owner) -> count written"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ngrams", NULL, -1, methods};

PyMODINIT_FUNC PyInit__ngrams(void) { return PyModule_Create(&module); }
