/* One GPT-2 decode step with int8 or float32 weights, in a single call (see native.py, which builds
and calls it).

Decoding one token reads every weight once, so its speed is set by how fast the weights stream from
memory, plus the cost of everything else the step does. Eager PyTorch spends about 2 ms a token
dispatching the ~500 small ops around its matrix-vector products; through this file a whole GPT-2
124M token takes about 18 ms in float32 and 6 ms in int8 on a 2-core Xeon. This file does the same step with one parallel
matrix-vector loop per Linear and plain loops for the rest, so nearly all the time goes to reading
weights (docs/speed-cpu.md).

int8 Linears hold quantize.py's weights: w[o][i] = q[o][i] * scale[o]. Each one's input vector is
rounded to int16 (one scale per vector; PyTorch's int8 kernel rounds it to bfloat16, 8 bits of
mantissa, so this path is closer to float32 than PyTorch's) and multiplied with integer instructions.
float32 Linears (scale NULL) multiply the float32 input with FMAs: the same arithmetic as PyTorch's,
in another order, so logits agree to float32 rounding.
Layout (row-major, batch 1): Linear weights (out, in); KV cache (n_layer, n_head, max_len, head_dim).

One source, several instruction sets: native.py defines exactly one of MINIGPT_AVX512, MINIGPT_AVX2
(x86) or MINIGPT_NEON (aarch64) with the matching compiler flags, or none for the portable C loop
(any CPU; the compiler vectorizes it as far as its baseline allows). Only the dot products (dot_rows,
float_dot_rows) differ between them. MINIGPT_LIBMVEC: glibc's vectorized tanhf is there to link
(x86-64 glibc).
*/
#include <math.h>
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
#endif

typedef struct {
    const void *weight; /* (rows, cols): int8 when scale is set, else float32 */
    const float *scale; /* (rows,): w[o][i] = q[o][i] * scale[o]; NULL for float32 weights */
    const float *bias;  /* (rows,), or NULL */
    int64_t rows, cols; /* cols: a multiple of 64 */
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
    Linear lm_head; /* tied: the token embeddings are its rows */
    const Block *blocks;
} Model;

/* Which variant this library is (native.py checks it after loading). */
const char *minigpt_isa(void) { return MINIGPT_ISA; }

enum { ROWS = 4 };            /* rows per dot_rows call: four int8 weight streams in flight */
enum { FLOAT_ROWS = 8 };      /* rows per float_dot_rows call: measured best of 2, 4, 8, 12, 16 (AVX-512, AVX2) */
enum { PREFETCH = 1024 };     /* bytes ahead of each stream; measured best of 0, 256, 1024 (AVX-512) */
enum { CHUNK = 256 };         /* columns summed in int32 before adding to float: |sum| < 256 * 127 * 32767 < 2^31 */

/* out[r] = q[r] . xq for `rows` (<= ROWS) consecutive weight rows of length cols (a multiple of 64),
   with the activations xq rounded to int16 (linear). Integer multiply-adds (vpmaddwd, VNNI's
   vpdpwssd, NEON's smlal) do in one instruction what widening each weight to float32 and an FMA do
   in three (docs/speed-cpu.md has the measurements). int32 sums are exact; each CHUNK of columns is
   added to a float32 sum. */
#if defined(MINIGPT_AVX512) || defined(MINIGPT_AVX2)
/* Both x86 variants share dot_rows below; what differs is the vector width and these few operations:
   madd64 adds the products of 64 weights of one row (p) and 64 activations (x) into acc; the F macros
   are float32 vector load and FMA. */
#  if defined(MINIGPT_AVX512)
typedef __m512i ivec;
typedef __m512 fvec;
#    define IZERO() _mm512_setzero_si512()
#    define FZERO() _mm512_setzero_ps()
#    define ADD_TO_FLOAT(total, acc) _mm512_add_ps(total, _mm512_cvtepi32_ps(acc))
#    define HSUM(total) _mm512_reduce_add_ps(total)
#    define FWIDTH 16
#    define FLOAD(p) _mm512_loadu_ps(p)
#    define FMADD(a, b, c) _mm512_fmadd_ps(a, b, c)
static inline ivec madd64(ivec acc, const int8_t *p, const int16_t *x) {
    const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
    const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + 32)));
    const __m512i x0 = _mm512_loadu_si512(x), x1 = _mm512_loadu_si512(x + 32);
#    ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(acc, w0, x0), w1, x1);
#    else
    return _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_madd_epi16(w0, x0), _mm512_madd_epi16(w1, x1)));
#    endif
}
#  else
typedef __m256i ivec;
typedef __m256 fvec;
#    define IZERO() _mm256_setzero_si256()
#    define FZERO() _mm256_setzero_ps()
#    define ADD_TO_FLOAT(total, acc) _mm256_add_ps(total, _mm256_cvtepi32_ps(acc))
#    define HSUM(total) hsum256(total)
#    define FWIDTH 8
#    define FLOAD(p) _mm256_loadu_ps(p)
#    define FMADD(a, b, c) _mm256_fmadd_ps(a, b, c)
static float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline ivec madd64(ivec acc, const int8_t *p, const int16_t *x) {
    for (int j = 0; j < 64; j += 32) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + j)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + j + 16)));
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(x + j));
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(x + j + 16));
        acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1)));
    }
    return acc;
}
#  endif

static void dot_rows(const int8_t *q, const int16_t *xq, int64_t cols, int rows, float *out) {
    fvec total[ROWS];
    for (int r = 0; r < ROWS; ++r) total[r] = FZERO();
    for (int64_t c = 0; c < cols; c += CHUNK) {
        const int64_t end = c + CHUNK < cols ? c + CHUNK : cols;
        ivec acc[ROWS];
        for (int r = 0; r < ROWS; ++r) acc[r] = IZERO();
        for (int64_t k = c; k < end; k += 64) {
            for (int r = 0; r < rows; ++r) {
                const int8_t *p = q + r * cols + k;
                _mm_prefetch((const char *)p + PREFETCH, _MM_HINT_T0);
                acc[r] = madd64(acc[r], p, xq + k);
            }
        }
        for (int r = 0; r < rows; ++r) total[r] = ADD_TO_FLOAT(total[r], acc[r]);
    }
    for (int r = 0; r < rows; ++r) out[r] = HSUM(total[r]);
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
#else
/* NEON and the portable loop: one row at a time; dot_chunk sums at most CHUNK int8 products exactly in
   int32, float_dot a float32 row. */
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

static void dot_rows(const int8_t *q, const int16_t *xq, int64_t cols, int rows, float *out) {
    for (int r = 0; r < rows; ++r) {
        const int8_t *row = q + r * cols;
        float total = 0.0f;
        for (int64_t c = 0; c < cols; c += CHUNK)
            total += (float)dot_chunk(row + c, xq + c, (c + CHUNK < cols ? c + CHUNK : cols) - c);
        out[r] = total;
    }
}

static void float_dot_rows(const float *w, const float *x, int64_t cols, int rows, float *out) {
    for (int r = 0; r < rows; ++r) out[r] = float_dot(w + r * cols, x, cols);
}
#endif

/* y = W x + bias, its rows split across the threads (exported for bench/matmul.py). For int8 weights,
   W x = (q xq) * scale * step: x is first rounded to int16 with one scale for the vector, step =
   amax / 32767, an error of at most 1.5e-5 of the largest activation, far below the int8 weights' own
   rounding (docs/speed-cpu.md). */
void linear(const Linear *l, const float *x, float *y, int threads) {
    const int64_t cols = l->cols;
    const int group = l->scale ? ROWS : FLOAT_ROWS;
    int16_t *xq = NULL;
    float step = 1.0f;
    if (l->scale) {
        if (!(xq = malloc(cols * sizeof(int16_t)))) abort();
        float amax = 0.0f;
        for (int64_t i = 0; i < cols; ++i) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
        const float inverse = amax > 0.0f ? 32767.0f / amax : 0.0f;
        step = amax / 32767.0f;
        for (int64_t i = 0; i < cols; ++i) xq[i] = (int16_t)lrintf(x[i] * inverse);
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < (l->rows + group - 1) / group; ++b) {
        const int64_t n = b * group;
        const int rows = l->rows - n < group ? (int)(l->rows - n) : group;
        float dots[FLOAT_ROWS];
        if (xq)
            dot_rows((const int8_t *)l->weight + n * cols, xq, cols, rows, dots);
        else
            float_dot_rows((const float *)l->weight + n * cols, x, cols, rows, dots);
        for (int r = 0; r < rows; ++r)
            y[n + r] = dots[r] * (xq ? step * l->scale[n + r] : 1.0f) + (l->bias ? l->bias[n + r] : 0.0f);
    }
    free(xq);
}

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

static float dot(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
    #pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

/* softmax(q k^T / sqrt(hs)) v for one query per head over the n_keys cached keys/values of one layer. */
static void attention(const Model *m, const float *q, const float *keys, const float *values, int64_t max_len,
                      int64_t n_keys, float *out, float *scores, int threads) {
    const int64_t hs = m->n_embd / m->n_head;
    const float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t h = 0; h < m->n_head; ++h) {
        const float *k = keys + h * max_len * hs, *v = values + h * max_len * hs;
        float *s = scores + h * n_keys, *o = out + h * hs;
        float max = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < n_keys; ++t) {
            s[t] = dot(q + h * hs, k + t * hs, hs) * scale;
            max = s[t] > max ? s[t] : max;
        }
        for (int64_t t = 0; t < n_keys; ++t) sum += s[t] = expf(s[t] - max);
        memset(o, 0, hs * sizeof(float));
        for (int64_t t = 0; t < n_keys; ++t) {
            const float p = s[t] / sum;
            #pragma omp simd
            for (int64_t d = 0; d < hs; ++d) o[d] += p * v[t * hs + d];
        }
    }
}

static void add(float *x, const float *y, int64_t n) {
    #pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

/* Token `token` at position `pos`: writes its keys and values to slot pos of the cache, attends to
   slots 0..pos, and writes the logits (lm_head.rows). Returns 0, or -1 if out of memory. */
int gpt2_step(const Model *m, int64_t token, int64_t pos, float *k_cache, float *v_cache, int64_t max_len,
                   float *logits, int threads) {
    const int64_t C = m->n_embd, hs = C / m->n_head, layer_size = m->n_head * max_len * hs;
    float *x = malloc(sizeof(float) * (5 * C + m->mlp_dim + m->n_head * (pos + 1)));
    if (!x) return -1;
    float *h = x + C, *qkv = h + C, *ff = qkv + 3 * C, *scores = ff + m->mlp_dim;

    const Linear *wte = &m->lm_head;
    for (int64_t i = 0; i < C; ++i)
        x[i] = (wte->scale ? ((const int8_t *)wte->weight)[token * C + i] * wte->scale[token]
                           : ((const float *)wte->weight)[token * C + i]) + m->wpe[pos * C + i];

    for (int64_t l = 0; l < m->n_layer; ++l) {
        const Block *b = &m->blocks[l];
        float *keys = k_cache + l * layer_size, *values = v_cache + l * layer_size;
        layer_norm(x, b->ln_1_weight, b->ln_1_bias, h, C, m->eps);
        linear(&b->c_attn, h, qkv, threads);
        for (int64_t head = 0; head < m->n_head; ++head) {
            memcpy(keys + (head * max_len + pos) * hs, qkv + C + head * hs, hs * sizeof(float));
            memcpy(values + (head * max_len + pos) * hs, qkv + 2 * C + head * hs, hs * sizeof(float));
        }
        attention(m, qkv, keys, values, max_len, pos + 1, h, scores, threads);
        linear(&b->attn_proj, h, qkv, threads); /* qkv is free again: reuse it for the projection */
        add(x, qkv, C);
        layer_norm(x, b->ln_2_weight, b->ln_2_bias, h, C, m->eps);
        linear(&b->c_fc, h, ff, threads);
        gelu_tanh(ff, m->mlp_dim);
        linear(&b->mlp_proj, ff, h, threads);
        add(x, h, C);
    }
    layer_norm(x, m->ln_f_weight, m->ln_f_bias, h, C, m->eps);
    linear(&m->lm_head, h, logits, threads);
    free(x);
    return 0;
}
