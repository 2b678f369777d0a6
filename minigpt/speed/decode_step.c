/* GPT-2 decode steps with int8, int4 or float32 weights: one token for each of n sequences ("rows"), in a single
call (see native.py, which builds and calls it).

Decoding one token reads every weight once, so its speed is set by how fast the weights stream from
memory, plus the cost of everything else the step does. Eager PyTorch spends about 2 ms a token
dispatching the ~500 small ops around its matrix-vector products; through this file a whole GPT-2
124M token takes about 18 ms in float32 and 4 ms in int8 on a 2-core Xeon. This file does the same step with one parallel
matrix-vector loop per Linear and plain loops for the rest, so nearly all the time goes to reading
weights (docs/speed-cpu.md).

A serving loop decodes many sequences at once (continuous batching): gpt2_step_rows takes a row per
sequence, each with its own model, token, position and KV cache. Each block of weight rows is loaded
once and multiplied with the input vectors of every row whose model shares that matrix (a base model and
its LoRA-merged copy share all but the merged Linears), so a step of many rows reads the weights about
once. Each row is computed exactly as alone (the same dot products, its own int16 rounding): its logits
and cache writes are bit for bit those of a step of that row alone. gpt2_step is the one-row case.
Rows may also share a cache at consecutive positions: a prompt read in one call (in each layer every row
writes its keys and values before any row attends), each of its tokens computed exactly as when decoded
one at a time; logits are computed only for the rows from logits_from on (a prompt's last token).
Where the CPU has AMX (Sapphire Rapids and later), int8 Linears multiply the vectors of 5 or more rows
in AMX tiles (amx_dots): the weight reads stay the same and the multiply-adds, which bound a step of
8 rows with vector instructions, take a fraction of the time (docs/speed-cpu.md). Every int8 dot
product is the exact integer rounded to float32 once, in the tiles as in the vector loops, so this
changes no bit either.

int8 Linears hold quantize.py's weights: w[o][i] = q[o][i] * scale[o]. int4 Linears hold int4.py's:
groups of GROUP columns, w[o][i] = (u[o][i] - 8) * scale[o][i / GROUP], u a 4-bit code (two per byte,
in the column order of int4.py's positions; int4_order puts each input vector in it) and the scales
float16. Each int8 or int4 Linear's input vector is rounded to int16 (one scale per
vector; PyTorch's int8 kernel rounds it to bfloat16, 8 bits of mantissa, so this path is closer to
float32 than PyTorch's) and multiplied with integer instructions (int8: exactly, see dot_rows).
float32 Linears (scale NULL) multiply the float32 input with FMAs: the same arithmetic as PyTorch's,
in another order, so logits agree to float32 rounding.
Layout (row-major): Linear weights (out, in); each row's KV cache (n_layer, n_head, max_len, head_dim),
the KVCache of one sequence.

One source, several instruction sets: native.py defines exactly one of MINIGPT_AVX512, MINIGPT_AVX2
(x86) or MINIGPT_NEON (aarch64) with the matching compiler flags, or none for the portable C loop
(any CPU; the compiler vectorizes it as far as its baseline allows). Only the dot products (dot_rows,
dot_rows4, float_dot_rows) differ between them; the avx512 variant adds the AMX kernel where the compiler
targets AMX (native.py adds -mamx-int8 on CPUs reporting amx_int8) and Linux grants the tiles
(minigpt_amx). MINIGPT_LIBMVEC: glibc's vectorized tanhf and expf are there to link (x86-64 glibc).

The library also reads a row of logits for what follows a step (minigpt_top, minigpt_log_probs at the
end): the token a greedy sampler takes and the log-probs a token event reports.
*/
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(MINIGPT_AVX512)
#  ifndef __AVX512BW__
#    error "MINIGPT_AVX512 needs -mavx512f -mavx512bw"
#  endif
#  include <immintrin.h>
#  define MINIGPT_ISA "avx512"
#elif defined(MINIGPT_AVX2)
#  if !defined(__AVX2__) || !defined(__FMA__)
#    error "MINIGPT_AVX2 needs -mavx2 -mfma"
#  endif
#  include <immintrin.h>
#  define MINIGPT_ISA "avx2"
#elif defined(MINIGPT_NEON)
#  ifndef __aarch64__
#    error "MINIGPT_NEON is the aarch64 variant"
#  endif
#  include <arm_neon.h>
#  define MINIGPT_ISA "neon"
#else
#  define MINIGPT_ISA "generic"
#endif

#ifdef MINIGPT_LIBMVEC
/* glibc's libmvec has SIMD tanhf; math.h declares it only under -ffast-math, so we do. */
#pragma omp declare simd notinbranch
float tanhf(float);
#pragma omp declare simd notinbranch
float expf(float);
#endif

enum { KIND_FLOAT32, KIND_INT8, KIND_INT4 }; /* a Linear's weights */
enum { GROUP = 32 };                          /* int4: columns per scale */

typedef struct {
    const void *weight; /* float32, int8: (rows, cols); int4: (rows, cols / 2) bytes, packed as int4.py says */
    const void *scale;  /* int8: float32 (rows,); int4: float16 (rows, cols / GROUP); float32: NULL */
    const float *bias;  /* (rows,), or NULL */
    int64_t rows, cols; /* cols: a multiple of 64 */
    int64_t kind;       /* KIND_* */
} Linear;

typedef struct {
    const float *ln_1_weight, *ln_1_bias;
    Linear c_attn, attn_proj;
    const float *ln_2_weight, *ln_2_bias;
    Linear c_fc, mlp_proj;
} Block;

typedef struct {
    int64_t n_layer, n_head, n_embd, mlp_dim;
    float eps;
    const float *wpe; /* (n_positions, n_embd) */
    const float *ln_f_weight, *ln_f_bias;
    Linear lm_head; /* tied: the token embeddings are its rows (int8 or float32; int4 models keep an int8 one) */
    const Block *blocks;
} Model;

/* Which variant this library is (native.py checks it after loading). */
const char *minigpt_isa(void) { return MINIGPT_ISA; }

#if defined(MINIGPT_AVX512) && defined(__AMX_INT8__)
#  define MINIGPT_AMX
static int amx_enabled; /* whether batched int8 rows use AMX: minigpt_amx */
#else
static const int amx_enabled = 0;
#endif

enum { ROWS = 4 };            /* rows per dot_rows call: four int8 weight streams in flight */
enum { VECS = 4 };            /* input vectors per dot_rows call: measured best of 2, 3, 4 (see dot_rows_fixed) */
enum { FLOAT_ROWS = 8 };      /* rows per float_dot_rows call: measured best of 2, 4, 8, 12, 16 (AVX-512, AVX2) */
enum { PREFETCH_BLOCKS = 2 }; /* the weights are prefetched this many blocks of rows ahead, ... */
enum { PREFETCH_MIN = 6144 }; /* ... and at least this many bytes ahead */
enum { CHUNK = 256 };         /* int4: columns summed in one vector of 16 int32 lanes (int4.py's positions) */
enum { INT32_SPAN = 512 };    /* int8: columns summed in int32, |sum| <= 512 * 127 * 32767 < 2^31 (|q| <= 127) */

/* out[v][r] = q[r] . xs[v] for `rows` (<= ROWS) consecutive weight rows of length cols (a multiple of
   64) and `vecs` (<= VECS) input vectors xs[v], the activations rounded to int16 (linear); out's rows
   are FLOAT_ROWS long, as linear_rows' one buffer for both kinds of weights.
   Integer multiply-adds (vpmaddwd, VNNI's vpdpwssd, NEON's smlal) do in one instruction what widening
   each weight to float32 and an FMA do in three (docs/speed-cpu.md has the measurements).
   int8: each dot product is computed exactly (int32 partial sums, added up in int64) and rounded to
   float32 once, so it is the same bit for bit however its products are split and ordered: in any
   variant, whichever vectors share the call, and in the AMX kernel (amx_dots). */
/* Attention's two products for one head (attend): s[t] = q . k_t and o = sum over t of p[t] v_t, for n keys
   and values of hs floats. These plain loops are the portable and NEON builds' and, on x86, those of
   head sizes that are not a multiple of the vector width; the x86 variants below vectorize them. */
static void key_scores_loop(const float *q, const float *k, int64_t n, int64_t hs, float *s) {
    for (int64_t t = 0; t < n; ++t) {
        float dot = 0.0f;
        #pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < hs; ++d) dot += q[d] * k[t * hs + d];
        s[t] = dot;
    }
}

static void weighted_values_loop(const float *p, const float *v, int64_t n, int64_t hs, float *o) {
    memset(o, 0, hs * sizeof(float));
    for (int64_t t = 0; t < n; ++t) {
        #pragma omp simd
        for (int64_t d = 0; d < hs; ++d) o[d] += p[t] * v[t * hs + d];
    }
}

#if defined(MINIGPT_AVX512) || defined(MINIGPT_AVX2)
/* Both x86 variants share dot_rows below; what differs is the vector width and these few operations:
   widen64 sign-extends 64 int8 weights of one row (p) to int16 in WIDE vectors, madd64 adds their
   products with 64 activations (x) into acc; the F macros are float32 vector load and FMA. */

/* int4: the 2n float16 group scales of a chunk of n (4 or 1) blocks of 64 columns at s, as float32. */
_Static_assert(CHUNK == 256, "a chunk of n = 4 blocks has the 8 scales one _mm256_cvtph_ps converts");
static inline __m256 half_scales(const uint16_t *s, const int n) {
    if (n == 4) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s));
    int32_t two; /* a row's last chunks: reading 8 scales could pass the end of the last row's */
    memcpy(&two, s, sizeof two);
    return _mm256_cvtph_ps(_mm_cvtsi32_si128(two));
}

#  if defined(MINIGPT_AVX512)
typedef __m512i ivec;
typedef __m512 fvec;
#    define WIDE 2
#    define IZERO() _mm512_setzero_si512()
#    define FZERO() _mm512_setzero_ps()
#    define HSUM(total) _mm512_reduce_add_ps(total)
#    define FWIDTH 16
#    define FLOAD(p) _mm512_loadu_ps(p)
#    define FMADD(a, b, c) _mm512_fmadd_ps(a, b, c)
#    define FSET1(s) _mm512_set1_ps(s)
#    define FSTORE(p, v) _mm512_storeu_ps(p, v)
#    define TO_FLOAT(acc) _mm512_cvtepi32_ps(acc)
static inline void widen64(ivec w[WIDE], const int8_t *p) {
    w[0] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
    w[1] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + 32)));
}

static inline ivec madd64(ivec acc, const ivec w[WIDE], const int16_t *x) {
    const __m512i x0 = _mm512_loadu_si512(x), x1 = _mm512_loadu_si512(x + 32);
#    ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(acc, w[0], x0), w[1], x1);
#    else
    return _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_madd_epi16(w[0], x0), _mm512_madd_epi16(w[1], x1)));
#    endif
}

/* int4: the 32 bytes of 64 positions (int4.py's packing: byte j holds position j in its low half, j + 32 in
   its high half) as int16 codes 0..15, w[0] positions 0-31 and w[1] positions 32-63. */
static inline void unpack64(ivec w[WIDE], const uint8_t *p) {
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    w[0] = _mm512_and_si512(bytes, _mm512_set1_epi16(15));
    w[1] = _mm512_srli_epi16(bytes, 4);
}

/* acc plus the products of one vector of int16 weights with as many activations, pairs summed per lane. */
static inline ivec madd16(ivec acc, ivec w, const int16_t *x) {
#    ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, w, _mm512_loadu_si512(x));
#    else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, _mm512_loadu_si512(x)));
#    endif
}

#    define ILOAD(p) _mm512_loadu_si512(p)
#    define ADD32(a, b) _mm512_add_epi32(a, b)
/* int4: the scales of a chunk's 16 int32 lanes (int4.py's positions: lane l holds group l / (8 / n) of the
   chunk of n blocks of 64), from its 2n float16 group scales at s. */
static inline void lane_scales(fvec scale[1], const uint16_t *s, const int n) {
    const __m512i group = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            n == 4 ? 1 : 3);
    scale[0] = _mm512_permutexvar_ps(group, _mm512_castps256_ps512(half_scales(s, n)));
}
#  else
typedef __m256i ivec;
typedef __m256 fvec;
#    define WIDE 4
#    define IZERO() _mm256_setzero_si256()
#    define FZERO() _mm256_setzero_ps()
#    define HSUM(total) hsum256(total)
#    define FWIDTH 8
#    define FLOAD(p) _mm256_loadu_ps(p)
#    define FMADD(a, b, c) _mm256_fmadd_ps(a, b, c)
#    define FSET1(s) _mm256_set1_ps(s)
#    define FSTORE(p, v) _mm256_storeu_ps(p, v)
#    define TO_FLOAT(acc) _mm256_cvtepi32_ps(acc)
static float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline void widen64(ivec w[WIDE], const int8_t *p) {
    for (int j = 0; j < WIDE; ++j) w[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16 * j)));
}

static inline ivec madd64(ivec acc, const ivec w[WIDE], const int16_t *x) {
    for (int j = 0; j < WIDE; j += 2) {
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(x + 16 * j));
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(x + 16 * j + 16));
        acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(w[j], x0), _mm256_madd_epi16(w[j + 1], x1)));
    }
    return acc;
}

/* int4, as the avx512 unpack64: w[0], w[1] positions 0-31, w[2], w[3] positions 32-63. */
static inline void unpack64(ivec w[WIDE], const uint8_t *p) {
    for (int j = 0; j < 2; ++j) {
        const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(p + 16 * j)));
        w[j] = _mm256_and_si256(bytes, _mm256_set1_epi16(15));
        w[2 + j] = _mm256_srli_epi16(bytes, 4);
    }
}

static inline ivec madd16(ivec acc, ivec w, const int16_t *x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, _mm256_loadu_si256((const __m256i *)x)));
}

#    define ILOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#    define ADD32(a, b) _mm256_add_epi32(a, b)
/* As the avx512 lane_scales, the 16 lanes in two vectors. */
static inline void lane_scales(fvec scale[2], const uint16_t *s, const int n) {
    const __m256 halves = half_scales(s, n);
    for (int a = 0; a < 2; ++a)
        scale[a] = _mm256_permutevar8x32_ps(
            halves, _mm256_srli_epi32(_mm256_set_epi32(8 * a + 7, 8 * a + 6, 8 * a + 5, 8 * a + 4, 8 * a + 3,
                                                       8 * a + 2, 8 * a + 1, 8 * a), n == 4 ? 1 : 3));
}
#  endif

/* The four sums of the lanes of acc[0 .. 3], each the int8 dot product of at most INT32_SPAN columns (so
   are all their partial sums): exact in int32. */
_Static_assert(ROWS == 4, "sums4 reduces ROWS accumulators");
static inline __m128i sums4(const ivec acc[ROWS]) {
#  if defined(MINIGPT_AVX512)
    __m256i half[ROWS];
    for (int r = 0; r < ROWS; ++r)
        half[r] = _mm256_add_epi32(_mm512_castsi512_si256(acc[r]), _mm512_extracti64x4_epi64(acc[r], 1));
#  else
    const __m256i *half = acc;
#  endif
    const __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(half[0], half[1]), _mm256_hadd_epi32(half[2], half[3]));
    return _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
}

/* dot_rows for a constant number of vectors (always inlined into dot_rows, one copy per count, so that
   the accumulators are registers). Each 64 weights of a row are widened to int16 once and multiplied
   with every vector: with the same prefetching, the Linears of an 8-row step took 16.9 ms widening
   them again for each vector, 13.6 ms sharing them (AVX-512). VECS = 4 measured best (the Linears of
   an 8-row step, AVX-512: 2, 3, 4 vectors 10.0, 9.3, 8.8 ms; AVX2: 4 and 2 even, 13.7 and 14.0 ms,
   though its 16 accumulators outnumber AVX2's 16 registers). A block of fewer than ROWS rows (a
   Linear's last) repeats its last row rather than test `rows` in the loops: the repeated row's sums
   are the same, and only `rows` results are written.

   Each stream prefetches the same columns PREFETCH_BLOCKS blocks ahead, into L2 (prefetching past the
   weights' end is harmless: prefetches do not fault). The pool gives each thread runs of consecutive
   blocks, so these are the ones it multiplies next, and the lead grows with the work per block, the
   number of vectors. Full GPT-2 124M steps (AVX-512, ms at 1 / 8 rows): 1024 bytes ahead into L1 (the
   former setting, a third of a 768-column block) 5.3 / 14.1; 1 block ahead 4.0 / 10.7; 2 blocks 3.6 /
   10.7; 4 blocks 3.5 / 10.8; 2 blocks into L1 3.5 / 11.6. And at least PREFETCH_MIN bytes ahead: two blocks
   of int4 rows 768 columns wide are 3 KB, and 6 KB made 124M-shape int4 steps 1.7-7.6% faster (three runs,
   the two builds taking turns in one process); leads longer than two blocks of gpt2-xl's rows were slower
   (4 blocks: int8 -5.7%), as was one fixed 8 KB lead for every width (int8 -3 to -5%). */
static inline int64_t prefetch_distance(int64_t row_bytes) {
    const int64_t blocks = PREFETCH_BLOCKS * ROWS * row_bytes;
    return blocks > PREFETCH_MIN ? blocks : PREFETCH_MIN;
}

static inline __attribute__((always_inline)) void dot_rows_fixed(const int8_t *q, const int16_t *const *xs,
                                                                 const int vecs, int64_t cols, int rows,
                                                                 float (*out)[FLOAT_ROWS]) {
    const int8_t *row[ROWS];
    const int64_t ahead = prefetch_distance(cols);
    for (int r = 0; r < ROWS; ++r) row[r] = q + (r < rows ? r : rows - 1) * cols;
    __m256i total[VECS]; /* each vector's ROWS sums, int64 */
    for (int v = 0; v < vecs; ++v) total[v] = _mm256_setzero_si256();
    for (int64_t c = 0; c < cols; c += INT32_SPAN) {
        const int64_t end = c + INT32_SPAN < cols ? c + INT32_SPAN : cols;
        ivec acc[VECS][ROWS];
        for (int v = 0; v < vecs; ++v)
            for (int r = 0; r < ROWS; ++r) acc[v][r] = IZERO();
        for (int64_t k = c; k < end; k += 64) {
            for (int r = 0; r < ROWS; ++r) {
                ivec w[WIDE];
                _mm_prefetch((const char *)row[r] + k + ahead, _MM_HINT_T1);
                widen64(w, row[r] + k);
                for (int v = 0; v < vecs; ++v) acc[v][r] = madd64(acc[v][r], w, xs[v] + k);
            }
        }
        for (int v = 0; v < vecs; ++v) total[v] = _mm256_add_epi64(total[v], _mm256_cvtepi32_epi64(sums4(acc[v])));
    }
    for (int v = 0; v < vecs; ++v) {
        int64_t sum[ROWS];
        _mm256_storeu_si256((__m256i *)sum, total[v]);
        for (int r = 0; r < rows; ++r) out[v][r] = (float)sum[r];
    }
}

_Static_assert(VECS == 4, "dot_rows has a case for each number of vectors up to VECS");
static void dot_rows(const int8_t *q, const int16_t *const *xs, int vecs, int64_t cols, int rows,
                     float (*out)[FLOAT_ROWS]) {
    switch (vecs) {
    case 1: dot_rows_fixed(q, xs, 1, cols, rows, out); break;
    case 2: dot_rows_fixed(q, xs, 2, cols, rows, out); break;
    case 3: dot_rows_fixed(q, xs, 3, cols, rows, out); break;
    case 4: dot_rows_fixed(q, xs, 4, cols, rows, out); break;
    }
}

/* int4: total[v][r] += the chunk of n (4 or 1) blocks of 64 columns at column c of each row[r], times the
   vectors xs[v] (int4_order: permuted as the codes are, offsets[v] their lanes' -8 * sums); ahead: the
   prefetch distance, as dot_rows'. The chunk's 16 int32 lanes (one vector, AVX2 two) start at the offsets,
   add the products of the codes 0..15 with the activations (each group's sum is then that of the
   weights q = u - 8, exact), are converted to float32 and multiply their groups' scales in one FMA.
   Two chains of multiply-adds (positions 0-31, 32-63 of each 64), added at the end: one chain of eight
   vpdpwssd per chunk took 2.42 ms for a token's int4 Linears (1 thread, medians of two runs), two 2.31. */
static inline __attribute__((always_inline)) void chunk4(const uint8_t *const row[ROWS], const uint16_t *const scales[ROWS],
                                                         const int16_t *const *xs, const int32_t *const *offsets,
                                                         const int vecs, int64_t c, const int n, int64_t ahead,
                                                         fvec total[VECS][ROWS]) {
    enum { ACCS = 16 / FWIDTH, IWIDTH = 32 / ACCS }; /* vectors of lanes; int16 in one */
    for (int r = 0; r < ROWS; ++r) {
        fvec scale[ACCS];
        lane_scales(scale, scales[r] + c / GROUP, n);
        ivec acc[VECS][ACCS], acc2[VECS][ACCS]; /* the two chains */
        for (int v = 0; v < vecs; ++v)
            for (int a = 0; a < ACCS; ++a) acc[v][a] = ILOAD(offsets[v] + c / 4 + FWIDTH * a), acc2[v][a] = IZERO();
        for (int j = 0; j < n; ++j) {
            const uint8_t *p = row[r] + (c + 64 * j) / 2;
            ivec w[WIDE];
            _mm_prefetch((const char *)p + ahead, _MM_HINT_T1);
            unpack64(w, p);
            for (int v = 0; v < vecs; ++v) {
                const int16_t *x = xs[v] + c + 64 * j;
                for (int a = 0; a < ACCS; ++a) { /* positions 0-31 (w[a]) and 32-63 (w[ACCS + a]) */
                    acc[v][a] = madd16(acc[v][a], w[a], x + IWIDTH * a);
                    acc2[v][a] = madd16(acc2[v][a], w[ACCS + a], x + 32 + IWIDTH * a);
                }
            }
        }
        for (int v = 0; v < vecs; ++v)
            for (int a = 0; a < ACCS; ++a)
                total[v][r] = FMADD(TO_FLOAT(ADD32(acc[v][a], acc2[v][a])), scale[a], total[v][r]);
    }
}

/* dot_rows for int4 weights: out[v][r] = sum over the row's groups of scale[g] * (its codes - 8) . xs[v], a
   chunk4 at a time. The same blocking as dot_rows (ROWS rows, up to VECS vectors sharing each unpacking,
   the prefetch PREFETCH_BLOCKS blocks ahead), and the same independence of each vector's result from the
   others of its call. */
static inline __attribute__((always_inline)) void dot_rows4_fixed(const uint8_t *q, const uint16_t *scales,
                                                                  const int16_t *const *xs,
                                                                  const int32_t *const *offsets, const int vecs,
                                                                  int64_t cols, int rows, float (*out)[FLOAT_ROWS]) {
    const uint8_t *row[ROWS];
    const uint16_t *row_scales[ROWS];
    for (int r = 0; r < ROWS; ++r) {
        const int64_t at = r < rows ? r : rows - 1;
        row[r] = q + at * cols / 2, row_scales[r] = scales + at * cols / GROUP;
    }
    fvec total[VECS][ROWS];
    for (int v = 0; v < vecs; ++v)
        for (int r = 0; r < ROWS; ++r) total[v][r] = FZERO();
    const int64_t ahead = prefetch_distance(cols / 2);
    int64_t c = 0;
    for (; c + CHUNK <= cols; c += CHUNK) chunk4(row, row_scales, xs, offsets, vecs, c, CHUNK / 64, ahead, total);
    for (; c < cols; c += 64) chunk4(row, row_scales, xs, offsets, vecs, c, 1, ahead, total);
    for (int v = 0; v < vecs; ++v)
        for (int r = 0; r < rows; ++r) out[v][r] = HSUM(total[v][r]);
}

static void dot_rows4(const uint8_t *q, const uint16_t *scales, const int16_t *const *xs,
                      const int32_t *const *offsets, int vecs, int64_t cols, int rows, float (*out)[FLOAT_ROWS]) {
    switch (vecs) {
    case 1: dot_rows4_fixed(q, scales, xs, offsets, 1, cols, rows, out); break;
    case 2: dot_rows4_fixed(q, scales, xs, offsets, 2, cols, rows, out); break;
    case 3: dot_rows4_fixed(q, scales, xs, offsets, 3, cols, rows, out); break;
    case 4: dot_rows4_fixed(q, scales, xs, offsets, 4, cols, rows, out); break;
    }
}

/* out[r] = w[r] . x for `rows` (<= FLOAT_ROWS) consecutive float32 rows: one FMA per loaded vector. */
static void float_dot_rows(const float *w, const float *x, int64_t cols, int rows, float *out) {
    fvec acc[FLOAT_ROWS];
    for (int r = 0; r < FLOAT_ROWS; ++r) acc[r] = FZERO();
    for (int64_t k = 0; k < cols; k += FWIDTH) {
        const fvec xv = FLOAD(x + k);
        for (int r = 0; r < rows; ++r) acc[r] = FMADD(FLOAD(w + r * cols + k), xv, acc[r]);
    }
    for (int r = 0; r < rows; ++r) out[r] = HSUM(acc[r]);
}

/* The keys as FLOAT_ROWS float32 weight rows at a time; the output's 4 vectors stay in registers while
   the values stream past, where the loop kept them in memory, a store and a load for each key. */
static void key_scores(const float *q, const float *k, int64_t n, int64_t hs, float *s) {
    if (hs % FWIDTH) {
        key_scores_loop(q, k, n, hs, s);
        return;
    }
    for (int64_t t = 0; t < n; t += FLOAT_ROWS)
        float_dot_rows(k + t * hs, q, hs, n - t < FLOAT_ROWS ? (int)(n - t) : FLOAT_ROWS, s + t);
}

static void weighted_values(const float *p, const float *v, int64_t n, int64_t hs, float *o) {
    if (hs % FWIDTH) {
        weighted_values_loop(p, v, n, hs, o);
        return;
    }
    for (int64_t d = 0; d < hs; d += 4 * FWIDTH) {
        const int width = hs - d < 4 * FWIDTH ? (int)((hs - d) / FWIDTH) : 4;
        fvec acc[4] = {FZERO(), FZERO(), FZERO(), FZERO()};
        for (int64_t t = 0; t < n; ++t)
            for (int j = 0; j < width; ++j) acc[j] = FMADD(FSET1(p[t]), FLOAD(v + t * hs + d + j * FWIDTH), acc[j]);
        for (int j = 0; j < width; ++j) FSTORE(o + d + j * FWIDTH, acc[j]);
    }
}
#else
/* NEON and the portable loop: one row and one vector at a time; dot_chunk sums at most INT32_SPAN int8
   products exactly in int32, float_dot a float32 row. They keep widening the weights for each vector:
   sharing the widening as the x86 dot_rows does is unmeasured on aarch64 hardware (the NEON variant is
   only run under emulation here), and the portable loop leaves its vectorization to the compiler. */
#  if defined(MINIGPT_NEON)
static int32_t dot_chunk(const int8_t *w, const int16_t *x, int64_t n) {
    int32x4_t acc[2] = {vdupq_n_s32(0), vdupq_n_s32(0)};
    for (int64_t k = 0; k < n; k += 16) {
        const int8x16_t v = vld1q_s8(w + k);
        const int16x8_t lo = vmovl_s8(vget_low_s8(v)), hi = vmovl_high_s8(v);
        const int16x8_t x0 = vld1q_s16(x + k), x1 = vld1q_s16(x + k + 8);
        acc[0] = vmlal_s16(acc[0], vget_low_s16(lo), vget_low_s16(x0));
        acc[1] = vmlal_high_s16(acc[1], lo, x0);
        acc[0] = vmlal_s16(acc[0], vget_low_s16(hi), vget_low_s16(x1));
        acc[1] = vmlal_high_s16(acc[1], hi, x1);
    }
    return vaddvq_s32(vaddq_s32(acc[0], acc[1]));
}

static float float_dot(const float *w, const float *x, int64_t n) {
    float32x4_t acc[4] = {vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)};
    for (int64_t k = 0; k < n; k += 16)
        for (int j = 0; j < 4; ++j) acc[j] = vfmaq_f32(acc[j], vld1q_f32(w + k + 4 * j), vld1q_f32(x + k + 4 * j));
    return vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
}
#  else
static int32_t dot_chunk(const int8_t *w, const int16_t *x, int64_t n) {
    int32_t s = 0;
    #pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; ++k) s += (int32_t)w[k] * x[k];
    return s;
}

static float float_dot(const float *w, const float *x, int64_t n) {
    float s = 0.0f;
    #pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; ++k) s += w[k] * x[k];
    return s;
}
#  endif

static void dot_rows(const int8_t *q, const int16_t *const *xs, int vecs, int64_t cols, int rows,
                     float (*out)[FLOAT_ROWS]) {
    for (int v = 0; v < vecs; ++v)
        for (int r = 0; r < rows; ++r) {
            const int8_t *row = q + r * cols;
            int64_t total = 0;
            for (int64_t c = 0; c < cols; c += INT32_SPAN)
                total += dot_chunk(row + c, xs[v] + c, (c + INT32_SPAN < cols ? c + INT32_SPAN : cols) - c);
            out[v][r] = (float)total;
        }
}

/* A float16 number's value (IEEE binary16: zeros, subnormals, normals; scales are never inf or NaN). */
static float half_to_float(uint16_t h) {
    const int exponent = (h >> 10) & 31, mantissa = h & 1023;
    const float magnitude = exponent ? ldexpf((float)(mantissa | 1024), exponent - 25) : ldexpf((float)mantissa, -24);
    return h & 0x8000 ? -magnitude : magnitude;
}

/* int4 (NEON too: plain C the compiler vectorizes): for one row and vector, the x86 chunk4's 16 lanes, then
   each group's sum (its lanes') times its scale. Always inlined, n constant. On this machine the generic
   build takes twice as long as the loop of the earlier layout (26 against 13 ms for a token's int4
   Linears, 2 threads; groups of 32 consecutive columns let it sum each group in one vectorized reduction);
   NEON is only run under emulation here. */
static inline __attribute__((always_inline)) float chunk4(const uint8_t *row, const uint16_t *scale, const int16_t *x,
                                                          const int32_t *offsets, int64_t c, const int n) {
    int32_t lane[16];
    memcpy(lane, offsets + c / 4, sizeof lane);
    for (int i = 0; i < 2 * n; ++i) { /* positions 32i .. 32i + 31: block i / 2's low or high codes */
        const uint8_t *p = row + (c + 64 * (i / 2)) / 2;
        const int shift = 4 * (i % 2);
        int32_t product[32];
        #pragma omp simd
        for (int e = 0; e < 32; ++e) product[e] = (p[e] >> shift & 15) * x[c + 32 * i + e];
        for (int l = 0; l < 16; ++l) lane[l] += product[2 * l] + product[2 * l + 1];
    }
    float total = 0.0f;
    for (int g = 0; g < 2 * n; ++g) {
        int32_t sum = 0;
        for (int l = 8 / n * g; l < 8 / n * (g + 1); ++l) sum += lane[l];
        total += half_to_float(scale[c / GROUP + g]) * (float)sum;
    }
    return total;
}

static void dot_rows4(const uint8_t *q, const uint16_t *scales, const int16_t *const *xs,
                      const int32_t *const *offsets, int vecs, int64_t cols, int rows, float (*out)[FLOAT_ROWS]) {
    for (int v = 0; v < vecs; ++v)
        for (int r = 0; r < rows; ++r) {
            const uint8_t *row = q + r * cols / 2;
            const uint16_t *scale = scales + r * cols / GROUP;
            float total = 0.0f;
            int64_t c = 0;
            for (; c + CHUNK <= cols; c += CHUNK) total += chunk4(row, scale, xs[v], offsets[v], c, CHUNK / 64);
            for (; c < cols; c += 64) total += chunk4(row, scale, xs[v], offsets[v], c, 1);
            out[v][r] = total;
        }
}

static void float_dot_rows(const float *w, const float *x, int64_t cols, int rows, float *out) {
    for (int r = 0; r < rows; ++r) out[r] = float_dot(w + r * cols, x, cols);
}

static void key_scores(const float *q, const float *k, int64_t n, int64_t hs, float *s) {
    key_scores_loop(q, k, n, hs, s);
}

static void weighted_values(const float *p, const float *v, int64_t n, int64_t hs, float *o) {
    weighted_values_loop(p, v, n, hs, o);
}
#endif

/* ---- Threads: a pool that never waits for a thread that has no work ------------------------------- */

/* Each parallel loop of a step (a Linear's weight blocks, the attention heads, GELU's rows) is a Job: its
   items are claimed a chunk at a time by whichever threads are running, the calling thread first; the
   call returns when every item is done. A helper thread that the OS has not scheduled simply claims
   nothing, so nobody waits for it. OpenMP's loops end in a barrier that waits for every thread of the
   team: on 2 cores shared with other work (a server's event loop and clients, other jobs) a thread that
   lost its core made the step wait a scheduler time slice at each of its ~70 loops (docs/speed.md).
   Helpers spin SPIN_NS for the next job (the gaps inside a step are microseconds), then sleep until the
   caller wakes them. One caller at a time uses the pool; a second caller (another thread) runs its
   loops alone rather than wait.
   Which thread computes an item changes no bit: each item's outputs are computed by one thread, whole. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

typedef void (*Work)(void *context, int64_t first, int64_t end); /* items first .. end - 1 */

enum { MAX_HELPERS = 63 };
enum { SPIN_NS = 200000 }; /* how long an idle helper polls before it sleeps */

typedef struct {
    Work work;
    void *context;
    _Atomic int64_t items, chunk; /* read by helpers that may hold a stale generation: atomic, checked by CAS */
    _Atomic int helpers;          /* helpers 0 .. helpers - 1 take part (the caller's threads - 1) */
    _Atomic int64_t done;         /* items finished */
} Job;

static struct {
    Job jobs[2];            /* generation g's job is jobs[g & 1]: the next one is written while a late helper
                               may still read the last one's counts */
    _Atomic uint64_t state; /* generation << 32 | the next unclaimed item: claims are one compare-and-swap */
    _Atomic int sleeping;   /* helpers asleep on wake */
    int started;            /* helper threads running */
    pthread_mutex_t lock, caller;
    pthread_cond_t wake;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .caller = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static uint32_t generation_of(uint64_t state) { return (uint32_t)(state >> 32); }

/* Claim and run chunks of generation gen's job until none is left or a newer job replaced it. */
static void take_part(uint32_t gen) {
    Job *job = &pool.jobs[gen & 1];
    uint64_t state = atomic_load(&pool.state);
    while (generation_of(state) == gen) {
        const int64_t next = (uint32_t)state, items = atomic_load_explicit(&job->items, memory_order_relaxed);
        if (next >= items) return;
        const int64_t chunk = atomic_load_explicit(&job->chunk, memory_order_relaxed);
        const int64_t end = next + chunk < items ? next + chunk : items;
        /* Succeeds only while gen is current: then its job's fields are not being rewritten. */
        if (atomic_compare_exchange_weak(&pool.state, &state, (uint64_t)gen << 32 | (uint64_t)end)) {
            job->work(job->context, next, end);
            atomic_fetch_add(&job->done, end - next);
            state = atomic_load(&pool.state);
        }
    }
}

static void *helper(void *argument) {
    const int index = (int)(intptr_t)argument;
    uint32_t seen = generation_of(atomic_load(&pool.state));
    for (;;) {
        uint32_t gen;
        for (int64_t since = now_ns(), polls = 0; (gen = generation_of(atomic_load(&pool.state))) == seen; ++polls) {
            cpu_relax();
            if (polls % 64 || now_ns() - since < SPIN_NS) continue;
            pthread_mutex_lock(&pool.lock);
            atomic_fetch_add(&pool.sleeping, 1); /* then check again: the caller reads `sleeping` after it posts */
            while (generation_of(atomic_load(&pool.state)) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = gen;
        if (index < atomic_load_explicit(&pool.jobs[gen & 1].helpers, memory_order_relaxed)) take_part(gen);
    }
    return NULL;
}

/* In a forked child: none of the parent's threads exist, so none sleeps, holds a lock or takes part. */
static void forget_helpers(void) {
    pool.started = 0;
    atomic_store(&pool.sleeping, 0);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_mutex_init(&pool.caller, NULL);
    pthread_cond_init(&pool.wake, NULL);
}

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, forget_helpers); }

/* Start helpers up to `wanted` (they live as long as the process); how many run. */
static int start_helpers(int wanted) {
    if (wanted > MAX_HELPERS) wanted = MAX_HELPERS;
    static pthread_once_t registered = PTHREAD_ONCE_INIT;
    pthread_once(&registered, register_fork_handler);
    for (; pool.started < wanted; ++pool.started) {
        pthread_t thread;
        pthread_attr_t attributes;
        pthread_attr_init(&attributes);
        pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&thread, &attributes, helper, (void *)(intptr_t)pool.started);
        pthread_attr_destroy(&attributes);
        if (failed) break;
    }
    return pool.started < wanted ? pool.started : wanted;
}

/* work(context, first, end) over items 0 .. items - 1, on up to `threads` threads. The chunks: several per
   thread, so a thread that is late leaves fewer items to the others, in runs of consecutive items (the
   weight prefetch runs ahead into the thread's next items). */
static void parallel_for(int64_t items, int threads, Work work, void *context) {
    const int64_t chunks = 4 * (int64_t)threads, chunk = items < chunks ? 1 : (items + chunks - 1) / chunks;
    if (threads <= 1 || items <= chunk || pthread_mutex_trylock(&pool.caller)) {
        work(context, 0, items);
        return;
    }
    const int helpers = start_helpers(threads - 1);
    const uint32_t gen = generation_of(atomic_load(&pool.state)) + 1;
    Job *job = &pool.jobs[gen & 1];
    job->work = work, job->context = context;
    atomic_store(&job->items, items);
    atomic_store(&job->chunk, chunk);
    atomic_store(&job->helpers, helpers);
    atomic_store(&job->done, 0);
    atomic_store(&pool.state, (uint64_t)gen << 32); /* posts the job */
    if (atomic_load(&pool.sleeping)) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    take_part(gen);
    /* Only items a helper claimed and is still computing are left to wait for. */
    for (int polls = 1; atomic_load(&job->done) < items; ++polls) {
        cpu_relax();
        if (polls % 4096 == 0) sched_yield(); /* the helper may be waiting for this core */
    }
    pthread_mutex_unlock(&pool.caller);
}

/* ---- Linears for a batch of rows -------------------------------------------------------------------- */

/* Working memory of linear_rows for n rows, in one allocation (batch_new). */
typedef struct {
    void *memory;
    const Linear **ls;  /* (n,) each row's Linear of the kind being multiplied; the caller fills it */
    int64_t *group;     /* (n,) each row's group: rows whose Linears share weights (and scales) */
    int64_t *members;   /* (n,) the rows ordered by group; group g is members[starts[g] .. starts[g + 1]) */
    int64_t *starts;    /* (n + 1,) */
    float *steps;       /* (n,) each row's int16 step, amax / 32767 (int8 Linears) */
    int16_t *xq;        /* (n, width) each row's input vector rounded to int16 (int8, int4 Linears; int4_order) */
    int32_t *offsets;   /* (n, width / 4) int4: each row's chunk lane offsets (int4_order) */
    uint8_t *packed;    /* (n, width, 2) a group's xq packed for AMX (amx_pack), if amx */
    int64_t width;      /* the widest input vector, cols */
    int amx;            /* whether AMX was enabled when the batch was made: it may multiply int8 groups */
} Batch;

/* A 64-byte multiple of bytes: each piece of a shared allocation starts on a cache line. */
static size_t piece(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

/* Batch for n rows whose input vectors have at most width columns, plus extra bytes for the caller at
   b->memory; 0, or -1 if out of memory. */
static int batch_new(Batch *b, int64_t n, int64_t width, size_t extra) {
    const size_t sizes[] = {piece(extra), piece(n * sizeof(Linear *)), piece(n * sizeof(int64_t)),
                            piece(n * sizeof(int64_t)), piece((n + 1) * sizeof(int64_t)), piece(n * sizeof(float)),
                            piece(n * width * sizeof(int16_t)), piece(n * width / 4 * sizeof(int32_t)),
                            amx_enabled ? piece(n * width * 2) : 0};
    size_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; ++i) total += sizes[i];
    char *p = aligned_alloc(64, total);
    if (!p) return -1;
    b->memory = p;
    b->ls = (const Linear **)(p += sizes[0]);
    b->group = (int64_t *)(p += sizes[1]);
    b->members = (int64_t *)(p += sizes[2]);
    b->starts = (int64_t *)(p += sizes[3]);
    b->steps = (float *)(p += sizes[4]);
    b->xq = (int16_t *)(p += sizes[5]);
    b->offsets = (int32_t *)(p += sizes[6]);
    b->packed = (uint8_t *)(p += sizes[7]);
    b->width = width;
    b->amx = amx_enabled;
    return 0;
}

static int same_weights(const Linear *a, const Linear *b) { return a->weight == b->weight && a->scale == b->scale; }

/* One Linear's multiplication for one group of rows of linear_rows (below): its vectors, the rows in
   members[0 .. m), read from x (float32) or b->xq (int8, int4), written to y. */
typedef struct {
    const Batch *b;
    const Linear *l;
    const int64_t *members;
    int64_t m;
    const float *x;
    int64_t x_stride;
    float *y;
    int64_t y_stride;
} Group;

/* Row j's outputs first .. first + count from their dot products with its vector. (The invariants are
   hoisted and the pointers restrict: the loop then vectorizes, which the many outputs of a batch need.) */
static inline void store_outputs(const Group *g, int64_t j, int64_t first, int count, const float *restrict dots) {
    const Linear *l = g->l;
    const float step = l->kind == KIND_FLOAT32 ? 1.0f : g->b->steps[j];
    const float *restrict bias = g->b->ls[j]->bias ? g->b->ls[j]->bias + first : NULL;
    const float *restrict scale = l->kind == KIND_INT8 ? (const float *)l->scale + first : NULL;
    float *restrict out = g->y + j * g->y_stride + first;
    for (int r = 0; r < count; ++r)
        out[r] = dots[r] * (scale ? step * scale[r] : step) + (bias ? bias[r] : 0.0f);
}

/* Weight rows first .. first + count (count <= ROWS; float32: FLOAT_ROWS) times every vector of the group. */
static void rows_block(const Group *g, int64_t first, int count) {
    const Linear *l = g->l;
    const int64_t cols = l->cols;
    for (int64_t i = 0; i < g->m; i += VECS) { /* the group's vectors, VECS at a time (float32: one by one) */
        const int vecs = g->m - i < VECS ? (int)(g->m - i) : VECS;
        const int64_t *members = g->members + i;
        float dots[VECS][FLOAT_ROWS];
        if (l->kind != KIND_FLOAT32) {
            const int16_t *xs[VECS];
            const int32_t *offsets[VECS];
            for (int v = 0; v < vecs; ++v)
                xs[v] = g->b->xq + members[v] * g->b->width, offsets[v] = g->b->offsets + members[v] * g->b->width / 4;
            if (l->kind == KIND_INT8)
                dot_rows((const int8_t *)l->weight + first * cols, xs, vecs, cols, count, dots);
            else /* int4: the group scales are applied inside */
                dot_rows4((const uint8_t *)l->weight + first * cols / 2, (const uint16_t *)l->scale + first * cols / GROUP,
                          xs, offsets, vecs, cols, count, dots);
        } else {
            for (int v = 0; v < vecs; ++v)
                float_dot_rows((const float *)l->weight + first * cols, g->x + members[v] * g->x_stride, cols, count,
                               dots[v]);
        }
        for (int v = 0; v < vecs; ++v) store_outputs(g, members[v], first, count, dots[v]);
    }
}

/* ---- AMX: int8 weights times many vectors ----------------------------------------------------------- */

#ifdef MINIGPT_AMX
#  include <sys/syscall.h>
#  include <unistd.h>
/* AMX (Sapphire Rapids and later; native.py compiles it in where the CPU reports amx_int8) multiplies a
   tile of 16 rows of 64 int8 with one of 16 rows of 4 N int8 into 16 x N int32 sums in one instruction,
   16 * 64 * N multiply-adds, where vpdpwssd does 32. The weights are the first operand as they are
   stored: a tile is the next 64 columns of 16 weight rows, loaded with the row length as stride, so no
   copy in another layout. The vectors are the second, packed by amx_pack. Their int16 values do not fit
   a byte, but x = 256 * (x >> 8) + (x & 255) with x >> 8 a signed byte and x & 255 an unsigned one, so
   q . x = 256 * (q . high) + q . low: one TDPBSSD (signed x signed) and one TDPBSUD (signed x unsigned).
   The tiles' int32 sums are exact for rows of up to AMX_MAX_COLS columns (a column adds at most 128 * 127
   to the high sums and 255 * 127 to the low), and the two combine into the exact int64 dot product that
   dot_rows computes: the same float32, bit for bit.
   Tiles: 0 and 1 two blocks of 16 weight rows; 2 and 3 the high and low bytes of the vectors; 4 and 5
   the first block's high and low sums, 6 and 7 the second's. */
enum { AMX_ROWS = 32, AMX_VECS = 16, AMX_MAX_COLS = 65536 };
/* Fewer vectors take dot_rows. The Linears of a GPT-2 124M step, 2 threads, ms with vpdpwssd / AMX:
   2 vectors 3.5 / 4.0, 3: 3.9 / 4.2, 4: 4.2 / 4.3, 5: 4.8 / 4.2, 6: 5.2 / 4.4, 8: 6.2 / 4.8, 16: 11.7 /
   5.9 (one vector 3.0, what reading the weights takes). */
enum { AMX_MIN_VECS = 5 };

/* Whether batched int8 rows use AMX from now on: wanted, and Linux lets this process use the tiles
   (asked once; the permission is the process's, for all its threads). native.py calls it at load,
   wanted unless MINIGPT_NO_AMX is set; the tests switch it. */
int minigpt_amx(int wanted) {
    static int permitted = -1;
    if (wanted && permitted < 0)
        permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    amx_enabled = wanted && permitted > 0;
    return amx_enabled;
}

static int amx_wins(const Group *g) {
    return g->b->amx && g->l->kind == KIND_INT8 && g->m >= AMX_MIN_VECS && g->l->cols <= AMX_MAX_COLS;
}

#  define ROW_NUMBERS _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15) /* of a tile */

/* Bytes of one packed tile of `vecs` vectors: 16 rows of 4 bytes per vector. */
static int64_t amx_tile_bytes(int vecs) { return 16 * 4 * vecs; }

/* Columns k .. k + 63 of the group's vectors (int16) as AMX's second operand, into b->packed: the group's
   vectors in slices of AMX_VECS, slice s at s * AMX_VECS * 2 * cols bytes; a slice of `vecs` vectors holds
   for each 64 columns a tile of their high bytes, then one of their low bytes, tile row t holding for
   vector v its columns 4t .. 4t + 3 at bytes 4v .. 4v + 3. (Threads pack different columns: different
   vectors of one slice share cache lines.) */
static void amx_pack(const Group *g, int64_t k) {
    const int64_t cols = g->l->cols;
    for (int64_t i = 0; i < g->m; ++i) {
        const int64_t start = i / AMX_VECS * AMX_VECS; /* the slice's first vector */
        const int vecs = g->m - start < AMX_VECS ? (int)(g->m - start) : AMX_VECS;
        const int64_t tile = amx_tile_bytes(vecs);
        const int16_t *x = g->b->xq + g->members[i] * g->b->width + k;
        uint8_t *at = g->b->packed + start * 2 * cols + k / 64 * 2 * tile + 4 * (i - start);
        const __m512i rows = _mm512_mullo_epi32(ROW_NUMBERS, _mm512_set1_epi32(4 * vecs)); /* each row's 4 bytes */
        const __m512i x0 = _mm512_loadu_si512(x), x1 = _mm512_loadu_si512(x + 32); /* vpmovwb keeps low bytes */
        const __m256i high0 = _mm512_cvtepi16_epi8(_mm512_srai_epi16(x0, 8)), low0 = _mm512_cvtepi16_epi8(x0);
        const __m256i high1 = _mm512_cvtepi16_epi8(_mm512_srai_epi16(x1, 8)), low1 = _mm512_cvtepi16_epi8(x1);
        _mm512_i32scatter_epi32(at, rows, _mm512_inserti64x4(_mm512_castsi256_si512(high0), high1, 1), 1);
        _mm512_i32scatter_epi32(at + tile, rows, _mm512_inserti64x4(_mm512_castsi256_si512(low0), low1, 1), 1);
    }
}

/* This thread's tiles for `vecs` vectors (each thread configures its own). */
static void amx_configure(int vecs) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } __attribute__((aligned(64))) config = {.palette = 1};
    for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.colsb[t] = t < 2 ? 64 : 4 * vecs;
    _tile_loadconfig(&config);
}

/* Lanes 8e .. 8e + 7 of v, widened to int64. */
static inline __m512i int64_half(__m512i v, int e) {
    return _mm512_cvtepi32_epi64(e ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v));
}

/* out[v][r] = (float)(q[r] . x_v) for AMX_ROWS weight rows from q (cols long) and `vecs` packed vectors,
   exactly as dot_rows; the tiles configured for vecs. The weights are prefetched as dot_rows does,
   PREFETCH_BLOCKS blocks ahead (1, 2 and 3 blocks of AMX_ROWS measured: 2 as good as any; into L1 or
   in address order rather than row by row: slower). */
static void amx_dots(const int8_t *q, int64_t cols, const uint8_t *packed, int vecs, float (*out)[AMX_ROWS]) {
    const int64_t tile = amx_tile_bytes(vecs);
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t k = 0; k < cols; k += 64) {
        for (int r = 0; r < AMX_ROWS; ++r)
            _mm_prefetch((const char *)q + (PREFETCH_BLOCKS * AMX_ROWS + r) * cols + k, _MM_HINT_T1);
        const uint8_t *x = packed + k / 64 * 2 * tile;
        _tile_loadd(0, q + k, cols);
        _tile_loadd(1, q + 16 * cols + k, cols);
        _tile_loadd(2, x, 4 * vecs);
        _tile_loadd(3, x + tile, 4 * vecs);
        _tile_dpbssd(4, 0, 2);
        _tile_dpbsud(5, 0, 3);
        _tile_dpbssd(6, 1, 2);
        _tile_dpbsud(7, 1, 3);
    }
    int32_t sums[4][16][AMX_VECS]; /* tiles 4 to 7: [weight row][vector] */
    _tile_stored(4, sums[0], sizeof *sums[0]);
    _tile_stored(5, sums[1], sizeof *sums[1]);
    _tile_stored(6, sums[2], sizeof *sums[2]);
    _tile_stored(7, sums[3], sizeof *sums[3]);
    const __m512i column = _mm512_mullo_epi32(ROW_NUMBERS, _mm512_set1_epi32(AMX_VECS)); /* a vector's 16 sums */
    for (int v = 0; v < vecs; ++v)
        for (int t = 0; t < 2; ++t) { /* rows 16t .. 16t + 15: 256 * high + low in int64, 8 rows at a time */
            const __m512i high = _mm512_i32gather_epi32(column, &sums[2 * t][0][v], 4);
            const __m512i low = _mm512_i32gather_epi32(column, &sums[2 * t + 1][0][v], 4);
            for (int e = 0; e < 2; ++e) {
                const __m512i sum = _mm512_add_epi64(_mm512_slli_epi64(int64_half(high, e), 8), int64_half(low, e));
                _mm256_storeu_ps(out[v] + 16 * t + 8 * e, _mm512_cvtepi64_ps(sum));
            }
        }
}

/* Weight rows first .. first + count (<= AMX_ROWS) times every vector of the group, AMX_VECS at a time.
   A block of fewer rows (a Linear's last) goes to dot_rows, which gives the same bits. */
static void amx_block(const Group *g, int64_t first, int count, int *configured) {
    if (count < AMX_ROWS) {
        for (int64_t f = first; f < first + count; f += ROWS)
            rows_block(g, f, first + count - f < ROWS ? (int)(first + count - f) : ROWS);
        return;
    }
    const int64_t cols = g->l->cols;
    for (int64_t i = 0; i < g->m; i += AMX_VECS) {
        const int vecs = g->m - i < AMX_VECS ? (int)(g->m - i) : AMX_VECS;
        if (vecs != *configured) amx_configure(*configured = vecs);
        float dots[AMX_VECS][AMX_ROWS];
        amx_dots((const int8_t *)g->l->weight + first * cols, cols, g->b->packed + i * 2 * cols, vecs, dots);
        for (int v = 0; v < vecs; ++v) store_outputs(g, g->members[i + v], first, AMX_ROWS, dots[v]);
    }
}

static void amx_release(int configured) {
    if (configured) _tile_release();
}
#else
/* No AMX in this build: linear_rows never takes the AMX path. */
enum { AMX_ROWS = ROWS };
int minigpt_amx(int wanted) { (void)wanted; return 0; }
static int amx_wins(const Group *g) { (void)g; return 0; }
static void amx_pack(const Group *g, int64_t k) { (void)g, (void)k; }
static void amx_block(const Group *g, int64_t first, int count, int *configured) {
    (void)g, (void)first, (void)count, (void)configured;
}
static void amx_release(int configured) { (void)configured; }
#endif

/* int4: one chunk of int4_order (n blocks of 64; always inlined, so that the copies are moves). */
static inline __attribute__((always_inline)) void order_chunk(int16_t *x, int32_t *lane, const int n) {
    const int m = 16 / n; /* the columns of a group in each 32 positions */
    int16_t column[CHUNK];
    memcpy(column, x, 64 * n * sizeof *x);
    for (int i = 0; i < 2 * n; ++i)
        for (int g = 0; g < 2 * n; ++g) memcpy(x + 32 * i + m * g, column + 32 * g + m * i, m * sizeof *x);
    for (int l = 0; l < 16; ++l) lane[l] = 0;
    for (int i = 0; i < 2 * n; ++i)
        for (int l = 0; l < 16; ++l) lane[l] -= 8 * (x[32 * i + 2 * l] + x[32 * i + 2 * l + 1]);
}

/* An int4 Linear's rounded input x (cols) in the order of its packed codes (int4.py's positions), and the
   starting values of each chunk's 16 lanes, -8 times the sum of the activations the lane multiplies,
   at offsets + c / 4 for the chunk at column c: with them the lanes sum codes 0..15 and still give
   (u - 8) . x, exactly, without two subtractions for each 64 codes and vector (dot_rows4). */
static void int4_order(int16_t *x, int32_t *offsets, int64_t cols) {
    int64_t c = 0;
    for (; c + CHUNK <= cols; c += CHUNK) order_chunk(x + c, offsets + c / 4, CHUNK / 64);
    for (; c < cols; c += 64) order_chunk(x + c, offsets + c / 4, 1);
}

/* parallel_for's work for linear_rows: weight blocks first .. end - 1 of a group (Group *), each AMX_ROWS rows
   (amx_blocks) or ROWS (int8, int4) or FLOAT_ROWS (float32) rows (weight_blocks); pack_columns packs
   the group's vectors for AMX, 64 columns an item. */
static void weight_blocks(void *group, int64_t first, int64_t end) {
    const Group *g = group;
    const int block = g->l->kind == KIND_FLOAT32 ? FLOAT_ROWS : ROWS;
    for (int64_t at = first * block; at < end * block && at < g->l->rows; at += block)
        rows_block(g, at, g->l->rows - at < block ? (int)(g->l->rows - at) : block);
}

static void amx_blocks(void *group, int64_t first, int64_t end) {
    const Group *g = group;
    int configured = 0; /* the vectors this thread's tiles are configured for, 0 before its first */
    for (int64_t at = first * AMX_ROWS; at < end * AMX_ROWS && at < g->l->rows; at += AMX_ROWS)
        amx_block(g, at, g->l->rows - at < AMX_ROWS ? (int)(g->l->rows - at) : AMX_ROWS, &configured);
    amx_release(configured);
}

static void pack_columns(void *group, int64_t first, int64_t end) {
    for (int64_t k = 64 * first; k < 64 * end; k += 64) amx_pack(group, k);
}

/* Row j's output y + j * y_stride = W_j (x + j * x_stride) + bias_j for the n rows, W_j = b->ls[j].
   Rows whose Linears share the weights are one group: each block of ROWS (int8) or FLOAT_ROWS (float32)
   weight rows is loaded and multiplied with every input vector of its group before the next (int8: VECS
   vectors a dot_rows call), while it is in the cache, so each distinct weight matrix streams from memory
   once per call however many rows read it. Each vector's dot products are exactly those of a call with
   it alone (dot_rows' sums do not depend on the other vectors of its call; float_dot_rows on the same
   weight rows; its own int16 rounding): batching changes no bit of any row.
   Each row adds its own Linear's bias (a group shares weights and scales).

   For int8 weights, W x = (q xq) * scale * step (int4: the sum over groups of (q xq) * scale, times step):
   x is first rounded to int16 with one scale for the vector, step = amax / 32767, an error of at most
   1.5e-5 of the largest activation, far below the weights' own rounding (docs/speed-cpu.md). */
static void linear_rows(Batch *b, int64_t n, const float *x, int64_t x_stride, float *y, int64_t y_stride,
                        int threads) {
    const Linear *const *ls = b->ls;
    /* Group the rows: each row against the groups found so far (a few: base and tuned models), then the
       rows of each group listed together, in row order. */
    int64_t groups = 0;
    for (int64_t j = 0; j < n; ++j) {
        int64_t g = 0;
        while (g < groups && !same_weights(ls[b->members[g]], ls[j])) ++g;
        if (g == groups) b->members[groups++] = j; /* members[g]: group g's first row, for now */
        b->group[j] = g;
    }
    int64_t k = 0;
    for (int64_t g = 0; g < groups; ++g) {
        b->starts[g] = k;
        for (int64_t j = 0; j < n; ++j)
            if (b->group[j] == g) b->members[k++] = j;
    }
    b->starts[groups] = k;

    /* Round each int8 row's input to int16, to nearest (even). Vector loops: the maximum is the same in
       any order, and rintf rounds as lrintf does but inlines to a vector instruction where lrintf is a
       call per element (rounding took 1.1 ms of an 8-row step with lrintf, 0.16 ms now; AVX-512). */
    for (int64_t j = 0; j < n; ++j) {
        if (ls[j]->kind == KIND_FLOAT32) continue;
        const float *xj = x + j * x_stride;
        int16_t *xq = b->xq + j * b->width;
        const int64_t cols = ls[j]->cols;
        float amax = 0.0f;
        #pragma omp simd reduction(max : amax)
        for (int64_t i = 0; i < cols; ++i) amax = fabsf(xj[i]) > amax ? fabsf(xj[i]) : amax;
        const float inverse = amax > 0.0f ? 32767.0f / amax : 0.0f;
        b->steps[j] = amax / 32767.0f;
        #pragma omp simd
        for (int64_t i = 0; i < cols; ++i) xq[i] = (int16_t)rintf(xj[i] * inverse);
        if (ls[j]->kind == KIND_INT4) int4_order(xq, b->offsets + j * b->width / 4, cols);
    }

    /* One parallel loop per group (one job more for a tuned model's own c_attn), its invariants hoisted:
       the weight blocks split across the threads as in a loop over one vector, which measured 1-4% faster
       at one row than a loop over every group's rows of a block of weight rows. */
    for (int64_t g = 0; g < groups; ++g) {
        const Linear *l = ls[b->members[b->starts[g]]];
        const int64_t *members = b->members + b->starts[g], m = b->starts[g + 1] - b->starts[g];
        const Group group = {b, l, members, m, x, x_stride, y, y_stride};
        const int amx = amx_wins(&group);
        const int64_t columns = l->cols / 64, block = amx ? AMX_ROWS : l->kind == KIND_FLOAT32 ? FLOAT_ROWS : ROWS;
        const int64_t blocks = (l->rows + block - 1) / block;
        if (amx) parallel_for(columns, threads, pack_columns, (void *)&group);
        parallel_for(blocks, threads, amx ? amx_blocks : weight_blocks, (void *)&group);
    }
}

/* y = W x + bias for one vector, the weight rows split across the threads (exported for bench/matmul.py). */
void linear(const Linear *l, const float *x, float *y, int threads) {
    Batch b;
    if (batch_new(&b, 1, l->cols, 0)) abort();
    b.ls[0] = l;
    linear_rows(&b, 1, x, 0, y, 0, threads);
    free(b.memory);
}

/* ---- the rest of a step, row by row ----------------------------------------------------------------- */

static void layer_norm(const float *x, const float *weight, const float *bias, float *out, int64_t n, float eps) {
    float mean = 0.0f, var = 0.0f;
    #pragma omp simd reduction(+ : mean)
    for (int64_t i = 0; i < n; ++i) mean += x[i];
    mean /= n;
    #pragma omp simd reduction(+ : var)
    for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
    const float rstd = 1.0f / sqrtf(var / n + eps);
    #pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * rstd * weight[i] + bias[i];
}

static void gelu_tanh(float *x, int64_t n) { /* GPT-2's "gelu_new" */
    #pragma omp simd
    for (int64_t i = 0; i < n; ++i)
        x[i] = 0.5f * x[i] * (1.0f + tanhf(0.7978845608f * (x[i] + 0.044715f * x[i] * x[i] * x[i])));
}

/* softmax(q k^T / sqrt(hs)) v for one head's query over its n_keys cached keys and values (hs apart),
   with s (n_keys,) for the scores. */
static void attend(const float *q, const float *k, const float *v, int64_t n_keys, int64_t hs, float *s, float *o) {
    const float scale = 1.0f / sqrtf((float)hs);
    float max = -INFINITY, sum = 0.0f;
    key_scores(q, k, n_keys, hs, s);
    for (int64_t t = 0; t < n_keys; ++t) {
        s[t] *= scale;
        max = s[t] > max ? s[t] : max;
    }
    for (int64_t t = 0; t < n_keys; ++t) sum += s[t] = expf(s[t] - max);
    for (int64_t t = 0; t < n_keys; ++t) s[t] /= sum;
    weighted_values(s, v, n_keys, hs, o);
}

static void add(float *x, const float *y, int64_t n) {
    #pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

/* parallel_for's work for a step's attention: (row, head) pairs first .. end - 1 (pair i: row i / H, head
   i % H) of layer l, each row's query in qkv, its output into h. */
typedef struct {
    int64_t l, H, C;
    const int64_t *positions, *max_lens;
    const float *qkv;
    float *const *k_caches, *const *v_caches;
    float *scores;
    const int64_t *score_at;
    float *h;
} Attention;

static void attend_heads(void *attention, int64_t first, int64_t end) {
    const Attention *a = attention;
    const int64_t H = a->H, C = a->C, hs = C / H;
    for (int64_t i = first; i < end; ++i) {
        const int64_t r = i / H, head = i % H, n_keys = a->positions[r] + 1;
        const int64_t at = (a->l * H + head) * a->max_lens[r] * hs; /* this layer's and head's first slot */
        attend(a->qkv + r * 3 * C + head * hs, a->k_caches[r] + at, a->v_caches[r] + at, n_keys, hs,
               a->scores + a->score_at[r] + head * n_keys, a->h + r * C + head * hs);
    }
}

/* parallel_for's work for GELU: rows first .. end - 1 of ff, F wide. */
typedef struct {
    float *ff;
    int64_t F;
} Gelu;

static void gelu_rows(void *gelu, int64_t first, int64_t end) {
    const Gelu *g = gelu;
    for (int64_t r = first; r < end; ++r) gelu_tanh(g->ff + r * g->F, g->F);
}

/* b->ls: each row's Linear at byte offset `field` (offsetof(Block, c_attn), ...) of its model's block l. */
static void block_linears(Batch *b, const Model *const *models, int64_t n, int64_t l, size_t field) {
    for (int64_t r = 0; r < n; ++r) b->ls[r] = (const Linear *)((const char *)&models[r]->blocks[l] + field);
}

/* One decode step of n independent rows (sequences): row r feeds token tokens[r] at position positions[r]
   to models[r], writes its keys and values to slot positions[r] of its own caches k_caches[r] and
   v_caches[r] (n_layer, n_head, max_lens[r], head_dim), attends to slots 0..positions[r], and writes its
   logits (lm_head.rows) at logits + r * lm_head.rows. The models must have one shape; they may share
   weights (a base model and a LoRA-merged one share all but the merged Linears), and rows whose Linears
   share weights read them once per step together (linear_rows). Each row's logits and cache slots are
   bit for bit those of a step of that row alone. Returns 0, -1 if out of memory, -2 if the models'
   shapes differ. */
int gpt2_step_rows(const Model *const *models, int64_t n, const int64_t *tokens, const int64_t *positions,
                   float *const *k_caches, float *const *v_caches, const int64_t *max_lens, int64_t logits_from,
                   float *logits, int threads) {
    if (n < 1) return 0;
    if (logits_from < 0 || logits_from >= n) return -3; /* at least one row's logits */
    const Model *m = models[0];
    const int64_t C = m->n_embd, F = m->mlp_dim, V = m->lm_head.rows, H = m->n_head, hs = C / H;
    int64_t keys = 0; /* key slots attended to, all rows together: each row's scores are H * (pos + 1) */
    for (int64_t r = 0; r < n; ++r) {
        const Model *o = models[r];
        if (o->n_layer != m->n_layer || o->n_head != H || o->n_embd != C || o->mlp_dim != F || o->lm_head.rows != V)
            return -2;
        keys += positions[r] + 1;
    }
    /* Where each row's scores start; then the activations of all rows, each (n, width) row-major: x the
       residual stream, h the normed input of the next Linear, qkv, ff the MLP's hidden layer; then the
       scores. */
    const size_t offsets = piece(n * sizeof(int64_t)), floats = n * (5 * C + F) + H * keys;
    Batch b;
    if (batch_new(&b, n, F > C ? F : C, offsets + floats * sizeof(float))) return -1;
    int64_t *score_at = b.memory;
    float *x = (float *)((char *)b.memory + offsets), *h = x + n * C, *qkv = h + n * C, *ff = qkv + n * 3 * C;
    float *scores = ff + n * F;
    for (int64_t r = 0, at = 0; r < n; at += H * (positions[r] + 1), ++r) score_at[r] = at;

    for (int64_t r = 0; r < n; ++r) {
        const Linear *wte = &models[r]->lm_head;
        const int64_t token = tokens[r], pos = positions[r];
        for (int64_t i = 0; i < C; ++i)
            x[r * C + i] = (wte->kind == KIND_INT8 ? ((const int8_t *)wte->weight)[token * C + i]
                                                       * ((const float *)wte->scale)[token]
                                       : ((const float *)wte->weight)[token * C + i]) + models[r]->wpe[pos * C + i];
    }

    for (int64_t l = 0; l < m->n_layer; ++l) {
        for (int64_t r = 0; r < n; ++r) {
            const Block *blk = &models[r]->blocks[l];
            layer_norm(x + r * C, blk->ln_1_weight, blk->ln_1_bias, h + r * C, C, models[r]->eps);
        }
        block_linears(&b, models, n, l, offsetof(Block, c_attn));
        linear_rows(&b, n, h, C, qkv, 3 * C, threads);
        for (int64_t r = 0; r < n; ++r) {
            const int64_t layer_size = H * max_lens[r] * hs;
            float *keys_r = k_caches[r] + l * layer_size, *values_r = v_caches[r] + l * layer_size;
            for (int64_t head = 0; head < H; ++head) {
                const int64_t slot = (head * max_lens[r] + positions[r]) * hs;
                memcpy(keys_r + slot, qkv + r * 3 * C + C + head * hs, hs * sizeof(float));
                memcpy(values_r + slot, qkv + r * 3 * C + 2 * C + head * hs, hs * sizeof(float));
            }
        }
        const Attention attention = {l, H, C, positions, max_lens, qkv, k_caches, v_caches, scores, score_at, h};
        parallel_for(n * H, threads, attend_heads, (void *)&attention);
        block_linears(&b, models, n, l, offsetof(Block, attn_proj));
        linear_rows(&b, n, h, C, qkv, C, threads); /* qkv is free again: reuse it for the projection */
        for (int64_t r = 0; r < n; ++r) {
            const Block *blk = &models[r]->blocks[l];
            add(x + r * C, qkv + r * C, C);
            layer_norm(x + r * C, blk->ln_2_weight, blk->ln_2_bias, h + r * C, C, models[r]->eps);
        }
        block_linears(&b, models, n, l, offsetof(Block, c_fc));
        linear_rows(&b, n, h, C, ff, F, threads);
        /* tanhf: the one costly elementwise op (mlp_dim per row), so several rows share the threads */
        const Gelu gelu = {ff, F};
        parallel_for(n, threads, gelu_rows, (void *)&gelu);
        block_linears(&b, models, n, l, offsetof(Block, mlp_proj));
        linear_rows(&b, n, ff, F, h, C, threads);
        for (int64_t r = 0; r < n; ++r) add(x + r * C, h + r * C, C);
    }
    for (int64_t r = logits_from; r < n; ++r) {
        const int64_t j = r - logits_from;
        layer_norm(x + r * C, models[r]->ln_f_weight, models[r]->ln_f_bias, h + j * C, C, models[r]->eps);
        b.ls[j] = &models[r]->lm_head;
    }
    linear_rows(&b, n - logits_from, h, C, logits, V, threads);
    free(b.memory);
    return 0;
}

/* One row: token `token` at position `pos` of one sequence's cache (gpt2_step_rows with n = 1). */
int gpt2_step(const Model *m, int64_t token, int64_t pos, float *k_cache, float *v_cache, int64_t max_len,
              float *logits, int threads) {
    return gpt2_step_rows(&m, 1, &token, &pos, &k_cache, &v_cache, &max_len, 0, logits, threads);
}

/* ---- Reading a row of logits ------------------------------------------------------------------------- */

/* The k largest of x[0 .. n) in descending order into values, their indices into ids, equal values in index
   order (ids[0] is the first of equal maxima, as argmax takes it); NaN is never taken. Returns how many were
   found: k, or the number of values that are not NaN if fewer. One pass: a block of 64 is searched only when
   its largest value beats the k-th best so far, which after the first blocks is rare. */
int minigpt_top(const float *x, int64_t n, int k, int64_t *ids, float *values) {
    int found = 0;
    for (int64_t start = 0; start < n; start += 64) {
        const int64_t end = start + 64 < n ? start + 64 : n;
        float best = -INFINITY;
        #pragma omp simd reduction(max : best)
        for (int64_t i = start; i < end; ++i) best = x[i] > best ? x[i] : best;
        if (found == k && !(best > values[k - 1])) continue;
        for (int64_t i = start; i < end; ++i) {
            const float v = x[i];
            int at;
            if (found < k && v == v)
                at = found++;
            else if (found == k && v > values[k - 1]) /* the last one drops out */
                at = k - 1;
            else
                continue;
            for (; at > 0 && values[at - 1] < v; --at) /* strictly: an equal value found earlier stays before */
                values[at] = values[at - 1], ids[at] = ids[at - 1];
            values[at] = v, ids[at] = i;
        }
    }
    return found;
}

/* log_softmax(x) for x[0 .. n) at token, into *token_log_prob, and at the k (<= n) largest values, into ids and
   values in minigpt_top's order; returns how many minigpt_top found. log_softmax(x) = (x - max) - log(sum of
   exp(x - max)), as PyTorch computes it, but summed in double: PyTorch's float32 sum of GPT-2's 50,257 terms
   is off by up to ~5e-6, the narrower variants' would be by more. */
int minigpt_log_probs(const float *x, int64_t n, int64_t token, int k, float *token_log_prob, int64_t *ids,
                      float *values) {
    const int found = minigpt_top(x, n, k, ids, values);
    const float max = found ? values[0] : NAN;
    double sum = 0.0;
    #pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += expf(x[i] - max);
    const float log_sum = logf((float)sum);
    *token_log_prob = (x[token] - max) - log_sum;
    for (int j = 0; j < found; ++j) values[j] = (values[j] - max) - log_sum;
    return found;
}
