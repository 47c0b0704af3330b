// llmflash's native sparse step: one layer's FFN contribution over a set of cached neuron rows, fused.
//
//   for each row r (neuron ids[r], stored at matrix row rows[r]):
//       z = a[rows[r]] . x[t] + bias[ids[r]]           (a: the gate rows of a gated FFN, else the up rows)
//       h = act(z) * (u[rows[r]] . x[t])               (gated FFN; a plain FFN: h = act(z); u is not read where
//                                                        act(z) == 0: a ReLU's zeros)
//       h = |h| > threshold ? h : 0                    (threshold rule only; on_act: |act(z)| > threshold instead)
//       h = mask[t][ids[r]] ? h : 0                    (a gated model's own gate only)
//       y[t] += h * down[rows[r]]                      (skipped when h == 0: a ReLU rule's zeros cost no reads)
//
// The rows are read in place from the neuron cache matrix (any row stride): nothing is gathered or copied, and no
// temporary depends on the number of rows. Rows are float32, bfloat16 or float16 (``llmflash_sparse_ffn``), or
// group-quantized int8 / int4 parts (``llmflash_sparse_ffn_q``: llmflash/quant.py's format, dequantized on the fly
// inside the dot products and axpys, in AVX-512 / AVX2 registers where the build targets them: each group's partial
// dot product is scaled once, float32 accumulation). Rows are split over threads (OpenMP, the runtime torch already
// loaded: same soname), each with its own y, summed at the end. Also ``llmflash_int8_linear``: a resident weight held in
// int8 with one scale per row times a decode step's float32 activations, in float32 (llmflash/quant.py's Int8Linear),
// and ``llmflash_q_linear``: the same for a resident weight whose rows are group-quantized parts (QLinear).
// Plain C ABI, loaded with ctypes (no Python headers, no torch headers: it builds in about a second with g++ alone).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

enum Act : int32_t { RELU = 0, SILU = 1, GELU = 2, GELU_TANH = 3, RELU2 = 4, RELU6 = 5, QUICK_GELU = 6 };
enum DType : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

inline float act(int32_t kind, float z) {
    switch (kind) {
        case RELU: return z > 0.f ? z : 0.f;
        case SILU: return z / (1.f + std::exp(-z));
        case GELU: return 0.5f * z * (1.f + std::erf(z * 0.70710678118654752f));
        case GELU_TANH: return 0.5f * z * (1.f + std::tanh(0.79788456080286536f * (z + 0.044715f * z * z * z)));
        case RELU2: { float r = z > 0.f ? z : 0.f; return r * r; }
        case RELU6: return z < 0.f ? 0.f : (z > 6.f ? 6.f : z);
        case QUICK_GELU: return z / (1.f + std::exp(-1.702f * z));
        default: return z;
    }
}

struct F32W { using T = float; static inline float get(const float* p, int64_t i) { return p[i]; } };
struct BF16W {
    using T = uint16_t;
    static inline float get(const uint16_t* p, int64_t i) {
        uint32_t b = static_cast<uint32_t>(p[i]) << 16;
        float f;
        std::memcpy(&f, &b, 4);
        return f;
    }
};
#ifdef __FLT16_MAX__
struct F16W { using T = _Float16; static inline float get(const _Float16* p, int64_t i) { return static_cast<float>(p[i]); } };
#endif

template <class W>
inline float dot(const typename W::T* w, const float* x, int64_t d) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < d; ++k) acc += W::get(w, k) * x[k];
    return acc;
}

template <class W>
void rows_range(const float* x, int64_t T, int64_t d, const typename W::T* a, const typename W::T* u,
                const typename W::T* down, int64_t stride, int64_t stride_down, const int64_t* rows, const int64_t* ids, int64_t lo,
                int64_t hi, const float* bias, const uint8_t* mask, int64_t mask_stride, int32_t kind,
                float threshold, int32_t on_act, float* y) {
    // a decode step (one token): the down rows added to y in blocks of 4, each value taking the rows' terms in row
    // order (the same sums, one pass over y per block instead of per row)
    float bh[4];
    const typename W::T* bd[4];
    int nb = 0;
    auto flush = [&](float* yt) {
        if (nb == 4) {
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) {
                float v = yt[k];
                v += bh[0] * W::get(bd[0], k);
                v += bh[1] * W::get(bd[1], k);
                v += bh[2] * W::get(bd[2], k);
                v += bh[3] * W::get(bd[3], k);
                yt[k] = v;
            }
        } else {
            for (int j = 0; j < nb; ++j) {
#pragma omp simd
                for (int64_t k = 0; k < d; ++k) yt[k] += bh[j] * W::get(bd[j], k);
            }
        }
        nb = 0;
    };
    for (int64_t r = lo; r < hi; ++r) {
        const int64_t row = rows[r], id = ids[r];
        const typename W::T* ar = a + row * stride;
        const typename W::T* dr = down + row * stride_down;
        const float b = bias ? bias[id] : 0.f;
        for (int64_t t = 0; t < T; ++t) {
            const float* xt = x + t * d;
            float h = act(kind, dot<W>(ar, xt, d) + b);
            if (on_act && !(std::fabs(h) > threshold)) h = 0.f;
            if (u && h != 0.f) h *= dot<W>(u + row * stride, xt, d);
            if (!on_act && threshold >= 0.f && !(std::fabs(h) > threshold)) h = 0.f;
            if (mask && !mask[t * mask_stride + id]) h = 0.f;
            if (h == 0.f) continue;
            float* yt = y + t * d;
            if (T == 1) {
                bh[nb] = h;
                bd[nb++] = dr;
                if (nb == 4) flush(yt);
                continue;
            }
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) yt[k] += h * W::get(dr, k);
        }
    }
    if (nb) flush(y);
}

template <class W>
void run(const float* x, int64_t T, int64_t d, const void* a, const void* u, const void* down, int64_t stride,
         int64_t stride_down, const int64_t* rows, const int64_t* ids, int64_t n, const float* bias, const uint8_t* mask,
         int64_t mask_stride, int32_t kind, float threshold, int32_t on_act, float* y, int32_t n_threads) {
    using E = typename W::T;
    const E* A = static_cast<const E*>(a);
    const E* U = static_cast<const E*>(u);
    const E* D = static_cast<const E*>(down);
    int nt = n_threads > 1 && n >= 64 ? n_threads : 1;
#ifdef _OPENMP
    if (nt > 1) {
        std::vector<float> part(static_cast<size_t>(nt - 1) * T * d, 0.f);  // threads 1.. accumulate apart
#pragma omp parallel num_threads(nt)
        {
            const int i = omp_get_thread_num(), k = omp_get_num_threads();
            const int64_t lo = n * i / k, hi = n * (i + 1) / k;
            float* yi = i == 0 ? y : part.data() + static_cast<size_t>(i - 1) * T * d;
            rows_range<W>(x, T, d, A, U, D, stride, stride_down, rows, ids, lo, hi, bias, mask, mask_stride, kind, threshold,
                          on_act, yi);
        }
        for (int i = 1; i < nt; ++i) {
            const float* p = part.data() + static_cast<size_t>(i - 1) * T * d;
            for (int64_t k = 0; k < T * d; ++k) y[k] += p[k];
        }
        return;
    }
#endif
    rows_range<W>(x, T, d, A, U, D, stride, stride_down, rows, ids, 0, n, bias, mask, mask_stride, kind, threshold, on_act, y);
}


// ------------------------------------------------------------------------------------------ group-quantized rows
//
// A part (gate row, up row, down column) of a quantized row: d codes (int8: one signed byte each; int4: q + 8, two per
// byte, the low nibble the even index), then d / G float16 scales (one per group of G values along d_model), read
// with memcpy (no alignment assumed). w[k] = q[k] * scale[k / G].

inline float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: mant * 2^-24, exact in float32
            const float f = static_cast<float>(mant) * 5.9604644775390625e-8f;
            return sign ? -f : f;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline float scale_at(const uint8_t* scales, int64_t g) {
    uint16_t h;
    std::memcpy(&h, scales + 2 * g, 2);
#ifdef __F16C__
    return _cvtsh_ss(h);  // one instruction (F16C: x86 since 2012), where the build targets it (-march=native)
#else
    return half_to_float(h);
#endif
}

// The shape of one part: d values in groups of G, ``bits`` per code.
struct QShape {
    int64_t d, G, groups, code_bytes;
    bool fast;  // vector steps: a group's codes are whole steps of W bytes (int8: G % W == 0; int4: G % (2 W) == 0)
};

// The vector steps: W codes converted to floats in registers (AVX-512: 16, AVX2: 8, where the build targets them;
// elsewhere the plain loops below, which the compiler may vectorize itself). Intrinsics, not the compilers' generic
// vectors: GCC 12 converts int8 vectors to float one element at a time.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define LLMFLASH_QVEC 1
constexpr int W = 16;
using V = __m512;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset(float a) { return _mm512_set1_ps(a); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline float vsum(V v) { return _mm512_reduce_add_ps(v); }
inline V codes8(const int8_t* p) {  // 16 int8 codes
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void codes4(const uint8_t* p, V& lo, V& hi) {  // 16 bytes: the low nibbles' values, the high ones' (q - 8)
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), m = _mm_set1_epi8(15);
    const __m512i eight = _mm512_set1_epi32(8);
    lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(b, m)), eight));
    hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m)), eight));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define LLMFLASH_QVEC 1
constexpr int W = 8;
using V = __m256;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset(float a) { return _mm256_set1_ps(a); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline float vsum(V v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_shuffle_ps(r, r, 1));
    return _mm_cvtss_f32(r);
}
inline V codes8(const int8_t* p) {  // 8 int8 codes
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void codes4(const uint8_t* p, V& lo, V& hi) {  // 8 bytes
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), m = _mm_set1_epi8(15);
    const __m256i eight = _mm256_set1_epi32(8);
    lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_and_si128(b, m)), eight));
    hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m)), eight));
}
#else
constexpr int W = 16;
#endif

// x . w of an int8 part; x [d]. Each group's partial dot product is scaled once; two running sums (even and odd
// groups) so that consecutive groups do not wait on each other.
inline float qdot8(const uint8_t* part, const float* x, const QShape& s) {
    const int8_t* q = reinterpret_cast<const int8_t*>(part);
    const uint8_t* sc = part + s.code_bytes;
#ifdef LLMFLASH_QVEC
    if (s.fast) {
        V acc0 = vzero(), acc1 = vzero();
        for (int64_t g = 0; g < s.groups; ++g) {
            const int8_t* qg = q + g * s.G;
            const float* xg = x + g * s.G;
            V p = vzero();
            for (int64_t c = 0; c < s.G; c += W) p = vfma(codes8(qg + c), vload(xg + c), p);
            if (g & 1)
                acc1 = vfma(p, vset(scale_at(sc, g)), acc1);
            else
                acc0 = vfma(p, vset(scale_at(sc, g)), acc0);
        }
        return vsum(vadd(acc0, acc1));
    }
#endif
    float r = 0.f;
    for (int64_t g = 0; g < s.groups; ++g) {
        float p = 0.f;
        for (int64_t k = g * s.G; k < (g + 1) * s.G; ++k) p += static_cast<float>(q[k]) * x[k];
        r += scale_at(sc, g) * p;
    }
    return r;
}

// The offsets' term of x . w for an asymmetric int4 part (llmflash/quant.py: w = s (q - 8) + s z / 16, z int8 after
// the scales): sum over groups of s z / 16 * (x's sum over the group), xsum [groups].
inline float qoffsets(const uint8_t* part, const float* xsum, const QShape& s) {
    const uint8_t* sc = part + s.code_bytes;
    const int8_t* z = reinterpret_cast<const int8_t*>(sc + 2 * s.groups);
    float r = 0.f;
    for (int64_t g = 0; g < s.groups; ++g) r += scale_at(sc, g) * static_cast<float>(z[g]) * xsum[g];
    return r * (1.f / 16.f);
}

// x . w of an int4 part; xe, xo [d / 2]: x's even and odd values (the low and high nibbles' partners).
inline float qdot4(const uint8_t* part, const float* xe, const float* xo, const QShape& s) {
    const uint8_t* sc = part + s.code_bytes;
    const int64_t gb = s.G / 2;  // bytes of a group's codes
#ifdef LLMFLASH_QVEC
    if (s.fast) {
        V acc0 = vzero(), acc1 = vzero();
        for (int64_t g = 0; g < s.groups; ++g) {
            const uint8_t* qg = part + g * gb;
            const float* eg = xe + g * gb;
            const float* og = xo + g * gb;
            V p = vzero(), lo, hi;
            for (int64_t c = 0; c < gb; c += W) {
                codes4(qg + c, lo, hi);
                p = vfma(hi, vload(og + c), vfma(lo, vload(eg + c), p));
            }
            if (g & 1)
                acc1 = vfma(p, vset(scale_at(sc, g)), acc1);
            else
                acc0 = vfma(p, vset(scale_at(sc, g)), acc0);
        }
        return vsum(vadd(acc0, acc1));
    }
#endif
    float r = 0.f;
    for (int64_t g = 0; g < s.groups; ++g) {
        float p = 0.f;
        for (int64_t j = g * gb; j < (g + 1) * gb; ++j) {
            const uint8_t b = part[j];
            p += static_cast<float>(static_cast<int>(b & 15) - 8) * xe[j] +
                 static_cast<float>(static_cast<int>(b >> 4) - 8) * xo[j];
        }
        r += scale_at(sc, g) * p;
    }
    return r;
}

// y += h * w of an int8 part; y [d].
inline void qaxpy8(float h, const uint8_t* part, float* y, const QShape& s) {
    const int8_t* q = reinterpret_cast<const int8_t*>(part);
    const uint8_t* sc = part + s.code_bytes;
    for (int64_t g = 0; g < s.groups; ++g) {
        const float hs = h * scale_at(sc, g);
        const int8_t* qg = q + g * s.G;
        float* yg = y + g * s.G;
#ifdef LLMFLASH_QVEC
        if (s.fast) {
            const V vh = vset(hs);
            for (int64_t c = 0; c < s.G; c += W) vstore(yg + c, vfma(vh, codes8(qg + c), vload(yg + c)));
            continue;
        }
#endif
        for (int64_t k = 0; k < s.G; ++k) yg[k] += hs * static_cast<float>(qg[k]);
    }
}

// y += h * w of an int4 part, into ye, yo [d / 2]: y's even and odd values.
inline void qaxpy4(float h, const uint8_t* part, float* ye, float* yo, const QShape& s) {
    const uint8_t* sc = part + s.code_bytes;
    const int64_t gb = s.G / 2;
    for (int64_t g = 0; g < s.groups; ++g) {
        const float hs = h * scale_at(sc, g);
        const uint8_t* qg = part + g * gb;
        float* eg = ye + g * gb;
        float* og = yo + g * gb;
#ifdef LLMFLASH_QVEC
        if (s.fast) {
            const V vh = vset(hs);
            for (int64_t c = 0; c < gb; c += W) {
                V lo, hi;
                codes4(qg + c, lo, hi);
                vstore(eg + c, vfma(vh, lo, vload(eg + c)));
                vstore(og + c, vfma(vh, hi, vload(og + c)));
            }
            continue;
        }
#endif
        for (int64_t j = 0; j < gb; ++j) {
            const uint8_t b = qg[j];
            eg[j] += hs * static_cast<float>(static_cast<int>(b & 15) - 8);
            og[j] += hs * static_cast<float>(static_cast<int>(b >> 4) - 8);
        }
    }
}

#ifdef LLMFLASH_QVEC
// y += sum over j < n of h[j] * w_j, the down parts ``parts`` of up to ``kBlock`` rows (fast shapes only), in one pass
// over y: each of y's values takes the rows' terms in row order with the same fused multiply-adds as ``qaxpy4`` /
// ``qaxpy8`` row after row (the same result to the bit), loading and storing y once per block instead of per row.
constexpr int kBlock = 4;
template <int BITS>
inline void qaxpy_block(const float* h, const uint8_t* const* parts, int n, float* ye, float* yo, const QShape& s) {
    const int64_t gb = BITS == 4 ? s.G / 2 : s.G;  // bytes of a group's codes
    for (int64_t g = 0; g < s.groups; ++g) {
        V hs[kBlock];
        for (int j = 0; j < n; ++j) hs[j] = vset(h[j] * scale_at(parts[j] + s.code_bytes, g));
        for (int64_t c = 0; c < gb; c += W) {
            if (BITS == 4) {
                V e = vload(ye + g * gb + c), o = vload(yo + g * gb + c);
                for (int j = 0; j < n; ++j) {
                    V lo, hi;
                    codes4(parts[j] + g * gb + c, lo, hi);
                    e = vfma(hs[j], lo, e);
                    o = vfma(hs[j], hi, o);
                }
                vstore(ye + g * gb + c, e);
                vstore(yo + g * gb + c, o);
            } else {
                V v = vload(ye + g * gb + c);
                for (int j = 0; j < n; ++j)
                    v = vfma(hs[j], codes8(reinterpret_cast<const int8_t*>(parts[j]) + g * gb + c), v);
                vstore(ye + g * gb + c, v);
            }
        }
    }
}
#endif

// Rows [lo, hi) of a quantized set into acc [T, d]: y's own order for int8; for int4 each token's y split into its
// even values then its odd ones (xs: x split the same way), so that every loop runs over consecutive floats.
// asym: bit 0, a's parts are asymmetric int4; bit 1, u's (xsums [T, groups]: each token's sums of x over the groups).
template <int BITS>
void qrows_range(const float* xs, int64_t T, const QShape& s, const uint8_t* a, const uint8_t* u, const uint8_t* down,
                 int64_t stride, int64_t stride_down, const int64_t* rows, const int64_t* ids, int64_t lo, int64_t hi,
                 const float* bias, const uint8_t* mask, int64_t mask_stride, int32_t kind, float threshold,
                 int32_t on_act, float* acc, int32_t asym, const float* xsums) {
    const int64_t d = s.d, half = d / 2;
#ifdef LLMFLASH_QVEC
    // a decode step (one token): the rows' down parts in blocks (``qaxpy_block``: the same sums, fewer passes over y)
    const bool block = T == 1 && s.fast;
    float bh[kBlock];
    const uint8_t* bd[kBlock];
    int nb = 0;
#endif
    for (int64_t r = lo; r < hi; ++r) {
        const int64_t row = rows[r], id = ids[r];
        const uint8_t* ar = a + row * stride;
        const uint8_t* ur = u ? u + row * stride : nullptr;
        const uint8_t* dr = down + row * stride_down;
        const float b = bias ? bias[id] : 0.f;
        for (int64_t t = 0; t < T; ++t) {
            const float* xt = xs + t * d;
            const float* xsum = xsums ? xsums + t * s.groups : nullptr;
            float z = BITS == 8 ? qdot8(ar, xt, s) : qdot4(ar, xt, xt + half, s);
            if (asym & 1) z += qoffsets(ar, xsum, s);
            float h = act(kind, z + b);
            if (on_act && !(std::fabs(h) > threshold)) h = 0.f;
            if (ur && h != 0.f) {
                float v = BITS == 8 ? qdot8(ur, xt, s) : qdot4(ur, xt, xt + half, s);
                if (asym & 2) v += qoffsets(ur, xsum, s);
                h *= v;
            }
            if (!on_act && threshold >= 0.f && !(std::fabs(h) > threshold)) h = 0.f;
            if (mask && !mask[t * mask_stride + id]) h = 0.f;
            if (h == 0.f) continue;
            float* at = acc + t * d;
#ifdef LLMFLASH_QVEC
            if (block) {
                bh[nb] = h;
                bd[nb++] = dr;
                if (nb == kBlock) {
                    qaxpy_block<BITS>(bh, bd, nb, at, at + half, s);
                    nb = 0;
                }
                continue;
            }
#endif
            if (BITS == 8)
                qaxpy8(h, dr, at, s);
            else
                qaxpy4(h, dr, at, at + half, s);
        }
    }
#ifdef LLMFLASH_QVEC
    if (nb) qaxpy_block<BITS>(bh, bd, nb, acc, acc + half, s);
#endif
}

template <int BITS>
void qrun(const float* x, int64_t T, const QShape& s, const uint8_t* a, const uint8_t* u, const uint8_t* down,
          int64_t stride, int64_t stride_down, const int64_t* rows, const int64_t* ids, int64_t n, const float* bias,
          const uint8_t* mask, int64_t mask_stride, int32_t kind, float threshold, int32_t on_act, float* y,
          int32_t n_threads, int32_t asym) {
    const int64_t d = s.d, half = d / 2, td = T * d;
    std::vector<float> xsums;  // asymmetric parts: each token's sums of x over the groups
    if (asym) {
        xsums.assign(static_cast<size_t>(T * s.groups), 0.f);
        for (int64_t t = 0; t < T; ++t)
            for (int64_t k = 0; k < d; ++k) xsums[t * s.groups + k / s.G] += x[t * d + k];
    }
    const float* xsp = asym ? xsums.data() : nullptr;
    // x in the kernel's order (int4: even values, then odd ones, per token), and one accumulator per thread
    std::vector<float> xs_own;
    const float* xs = x;
    if (BITS == 4) {
        xs_own.resize(static_cast<size_t>(td));
        for (int64_t t = 0; t < T; ++t)
            for (int64_t j = 0; j < half; ++j) {
                xs_own[t * d + j] = x[t * d + 2 * j];
                xs_own[t * d + half + j] = x[t * d + 2 * j + 1];
            }
        xs = xs_own.data();
    }
    int nt = n_threads > 1 && n >= 64 ? n_threads : 1;
#ifndef _OPENMP
    nt = 1;
#endif
    std::vector<float> acc(static_cast<size_t>(nt) * td, 0.f);
    if (nt > 1) {
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
        {
            const int i = omp_get_thread_num(), k = omp_get_num_threads();
            const int64_t lo = n * i / k, hi = n * (i + 1) / k;
            qrows_range<BITS>(xs, T, s, a, u, down, stride, stride_down, rows, ids, lo, hi, bias, mask, mask_stride,
                              kind, threshold, on_act, acc.data() + static_cast<size_t>(i) * td, asym, xsp);
        }
#endif
    } else {
        qrows_range<BITS>(xs, T, s, a, u, down, stride, stride_down, rows, ids, 0, n, bias, mask, mask_stride, kind,
                          threshold, on_act, acc.data(), asym, xsp);
    }
    for (int i = 0; i < nt; ++i) {
        const float* p = acc.data() + static_cast<size_t>(i) * td;
        for (int64_t t = 0; t < T; ++t) {
            float* yt = y + t * d;
            const float* pt = p + t * d;
            if (BITS == 8) {
                for (int64_t k = 0; k < d; ++k) yt[k] += pt[k];
            } else {
                for (int64_t j = 0; j < half; ++j) {
                    yt[2 * j] += pt[j];
                    yt[2 * j + 1] += pt[half + j];
                }
            }
        }
    }
}

#ifdef LLMFLASH_QVEC
inline V wload(const float* p) { return vload(p); }
inline V wload(const int8_t* p) { return codes8(p); }

// w . x over the whole vector steps of k values (float32 or int8 weights), four independent sums: one row of a decode
// step's stream. Sets c to where the steps end (the caller adds the tail).
template <class T>
inline float dot4(const T* w, const float* x, int64_t k, int64_t& c) {
    V a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    for (c = 0; c + 4 * W <= k; c += 4 * W) {
        a0 = vfma(wload(w + c), vload(x + c), a0);
        a1 = vfma(wload(w + c + W), vload(x + c + W), a1);
        a2 = vfma(wload(w + c + 2 * W), vload(x + c + 2 * W), a2);
        a3 = vfma(wload(w + c + 3 * W), vload(x + c + 3 * W), a3);
    }
    for (; c + W <= k; c += W) a0 = vfma(wload(w + c), vload(x + c), a0);
    return vsum(vadd(vadd(a0, a1), vadd(a2, a3)));
}
#endif

// ------------------------------------------------------------------------------------ int8 weight-only linear
//
// y[t, r] = scale[r] * (q[r] . x[t]) (+ bias[r]): a resident weight held in int8 with one float32 scale per row
// (llmflash/quant.py's Int8Linear), float32 activations and accumulation (torch's own int8 kernel takes bfloat16
// activations and returns bfloat16). Rows [lo, hi).
void i8rows(const float* x, int64_t T, int64_t k, const int8_t* q, const float* scale, const float* bias, float* y,
            int64_t m, int64_t lo, int64_t hi) {
    constexpr int64_t MAXT = 8;
    int64_t r = lo;
#ifdef LLMFLASH_QVEC
    if (T == 1) {  // a decode step: one row after the other (a stream), four independent sums per row
        for (; r < hi; ++r) {
            const int8_t* qr = q + r * k;
            int64_t c = 0;
            float out = dot4(qr, x, k, c);
            for (; c < k; ++c) out += static_cast<float>(qr[c]) * x[c];
            y[r] = out * scale[r] + (bias ? bias[r] : 0.f);
        }
    }
#endif
    for (; r < hi; ++r) {
        const int8_t* qr = q + r * k;
        for (int64_t t0 = 0; t0 < T; t0 += MAXT) {
            const int64_t nt = T - t0 < MAXT ? T - t0 : MAXT;
            float out[MAXT];
            int64_t c = 0;
#ifdef LLMFLASH_QVEC
            V acc[MAXT];
            for (int64_t t = 0; t < nt; ++t) acc[t] = vzero();
            for (; c + W <= k; c += W) {
                const V w = codes8(qr + c);
                for (int64_t t = 0; t < nt; ++t) acc[t] = vfma(w, vload(x + (t0 + t) * k + c), acc[t]);
            }
            for (int64_t t = 0; t < nt; ++t) out[t] = vsum(acc[t]);
#else
            for (int64_t t = 0; t < nt; ++t) out[t] = 0.f;
#endif
            for (; c < k; ++c)
                for (int64_t t = 0; t < nt; ++t) out[t] += static_cast<float>(qr[c]) * x[(t0 + t) * k + c];
            for (int64_t t = 0; t < nt; ++t)
                y[(t0 + t) * m + r] = out[t] * scale[r] + (bias ? bias[r] : 0.f);
        }
    }
}

// -------------------------------------------------------------------- group-quantized weight-only linear
//
// y[t, r] = w[r] . x[t] (+ bias[r]): a resident weight whose rows are group-quantized parts (llmflash/quant.py's
// QLinear: each row d codes then d / G float16 scales, rows ``stride`` bytes apart), float32 activations (xs: x in the
// kernel's order, int4: each token's even values then its odd ones), accumulation and output. Rows [lo, hi).
template <int BITS>
void qlinear_rows(const float* xs, int64_t T, const QShape& s, const uint8_t* w, int64_t stride, const float* bias,
                  float* y, int64_t m, int64_t lo, int64_t hi) {
    const int64_t d = s.d, half = d / 2;
    for (int64_t r = lo; r < hi; ++r) {
        const uint8_t* wr = w + r * stride;
        const float b = bias ? bias[r] : 0.f;
        for (int64_t t = 0; t < T; ++t) {
            const float* xt = xs + t * d;
            y[t * m + r] = (BITS == 8 ? qdot8(wr, xt, s) : qdot4(wr, xt, xt + half, s)) + b;
        }
    }
}


// ------------------------------------------------------------------------ a decoder layer's attention, one token
//
// A Llama-family layer's decode step around its feed-forward part (llmflash/decode_step.py), in two calls on either
// side of the key/value cache's append (transformers' cache keeps the keys and values):
//   attn_in:  xn = rmsnorm(x) * w_in; q, k, v = Wq xn, Wk xn, Wv xn (+ biases); rotary embedding on q and k
//   attn_out: per query head h (kv head h / (H / H_kv)): o_h = softmax(q_h K^T * scaling) V;
//             h = x + Wo o (+ bias); xn = rmsnorm(h) * w_post (the feed-forward part's input)
// The weights are described by LinearDesc: float32 rows, int8 rows with one float32 scale each (Int8Linear), or
// group-quantized rows (QLinear); float32 activations and accumulation throughout.
struct LinearDesc {
    int64_t kind;  // 0: float32 rows, ``stride`` elements apart; 1: int8 rows [m, k] + float32 scale [m]; 2: group-quantized rows, ``stride`` bytes apart
    const void* w;
    const float* scale;
    const float* bias;  // float32 [m] or NULL
    int64_t stride;
    int64_t bits;
    int64_t group_size;
    int64_t m;  // outputs
    int64_t k;  // inputs
};

void f32rows(const float* x, int64_t k, const float* w, int64_t stride, const float* bias, float* y, int64_t lo,
             int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
        const float* wr = w + r * stride;
        int64_t c = 0;
#ifdef LLMFLASH_QVEC
        float out = dot4(wr, x, k, c);
#else
        float out = 0.f;
#endif
        for (; c < k; ++c) out += wr[c] * x[c];
        y[r] = out + (bias ? bias[r] : 0.f);
    }
}

// y [m] = W x (+ bias): one token through a LinearDesc; rows over ``nt`` threads where there are many. 0, or -1 for a
// description this build cannot compute.
int32_t linear_apply(const LinearDesc& L, const float* x, float* y, int32_t nt, std::vector<float>& xs_own) {
    const int64_t k = L.k, m = L.m;
    if (L.kind == 2 && (L.bits != 8 && L.bits != 4)) return -1;
    if (L.kind == 2 && (L.group_size <= 0 || L.group_size % 2 || k % L.group_size)) return -1;
    if (L.kind < 0 || L.kind > 2) return -1;
    const QShape s{k, L.group_size > 0 ? L.group_size : 1, L.group_size > 0 ? k / L.group_size : 0,
                   L.kind == 2 ? k * L.bits / 8 : 0, L.kind == 2 && L.group_size % (L.bits == 8 ? W : 2 * W) == 0};
    const float* xs = x;
    if (L.kind == 2 && L.bits == 4) {  // the kernel's order: even values, then odd ones
        const int64_t half = k / 2;
        xs_own.resize(static_cast<size_t>(k));
        for (int64_t j = 0; j < half; ++j) {
            xs_own[j] = x[2 * j];
            xs_own[half + j] = x[2 * j + 1];
        }
        xs = xs_own.data();
    }
    auto rows = [&](int64_t lo, int64_t hi) {
        if (L.kind == 0)
            f32rows(x, k, static_cast<const float*>(L.w), L.stride, L.bias, y, lo, hi);
        else if (L.kind == 1)
            i8rows(x, 1, k, static_cast<const int8_t*>(L.w), L.scale, L.bias, y, m, lo, hi);
        else if (L.bits == 8)
            qlinear_rows<8>(xs, 1, s, static_cast<const uint8_t*>(L.w), L.stride, L.bias, y, m, lo, hi);
        else
            qlinear_rows<4>(xs, 1, s, static_cast<const uint8_t*>(L.w), L.stride, L.bias, y, m, lo, hi);
    };
#ifdef _OPENMP
    if (nt > 1 && m >= 256) {
#pragma omp parallel num_threads(nt)
        {
            const int i = omp_get_thread_num(), n = omp_get_num_threads();
            rows(m * i / n, m * (i + 1) / n);
        }
        return 0;
    }
#endif
    (void)nt;
    rows(0, m);
    return 0;
}

// out [d] = x * rsqrt(mean(x^2) + eps) * w (transformers' LlamaRMSNorm in float32)
void rmsnorm(const float* x, int64_t d, const float* w, float eps, float* out) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) out[i] = w[i] * (x[i] * r);
}

// the rotary embedding of ``heads`` heads of ``hd`` values in v, transformers' convention: v * cos + rotate_half(v)
// * sin, rotate_half(v) = (-v[hd/2:], v[:hd/2]); cos, sin [hd]
void rope(float* v, int64_t heads, int64_t hd, const float* cos, const float* sin) {
    const int64_t half = hd / 2;
    for (int64_t h = 0; h < heads; ++h) {
        float* p = v + h * hd;
        for (int64_t i = 0; i < half; ++i) {
            const float a = p[i], b = p[i + half];
            p[i] = a * cos[i] - b * sin[i];
            p[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

}  // namespace

extern "C" {

// Version of this ABI: the loader refuses a library of another version.
int32_t llmflash_step_version() { return 7; }

// A Llama-family layer's attention for one token, before the key/value cache's append (see LinearDesc above): x, w_in
// [d]; cos, sin [hd]; out: xn [d] (x normalized), q [n_heads * hd], k and v [n_kv * hd] (q and k rotated). Returns 0,
// or -1 for a weight description this build cannot compute.
int32_t llmflash_attn_in(const float* x, int64_t d, const float* w_in, float eps, const LinearDesc* wq,
                         const LinearDesc* wk, const LinearDesc* wv, const float* cos, const float* sin, int64_t hd,
                         int64_t n_heads, int64_t n_kv, float* xn, float* q, float* k, float* v, int32_t n_threads) {
    std::vector<float> xs;
    rmsnorm(x, d, w_in, eps, xn);
    if (linear_apply(*wq, xn, q, n_threads, xs) || linear_apply(*wk, xn, k, n_threads, xs) ||
        linear_apply(*wv, xn, v, n_threads, xs))
        return -1;
    rope(q, n_heads, hd, cos, sin);
    rope(k, n_kv, hd, cos, sin);
    return 0;
}

// The rest of it, after the append: q [n_heads * hd]; keys, values: T cached positions per kv head, ``head_stride``
// elements between kv heads and ``pos_stride`` between positions (float32); x: the layer's input [d] (the residual);
// out: h [d] = x + Wo o (+ bias) (the residual stream after attention) and xn [d] = rmsnorm(h) * w_post. Returns 0, or
// -1 for a weight description this build cannot compute.
int32_t llmflash_attn_out(const float* q, const float* keys, const float* values, int64_t T, int64_t head_stride,
                          int64_t pos_stride, int64_t hd, int64_t n_heads, int64_t n_kv, float scaling,
                          const LinearDesc* wo, const float* x, int64_t d, const float* w_post, float eps, float* h,
                          float* xn, int32_t n_threads) {
    if (n_kv <= 0 || n_heads % n_kv || T <= 0) return -1;
    const int64_t group = n_heads / n_kv;
    std::vector<float> o(static_cast<size_t>(n_heads * hd)), scores(static_cast<size_t>(n_heads * T));
    auto head = [&](int64_t hh) {
        const float* qh = q + hh * hd;
        const float* K = keys + (hh / group) * head_stride;
        const float* Vv = values + (hh / group) * head_stride;
        float* sc = scores.data() + hh * T;
        float mx = -INFINITY;
        for (int64_t t = 0; t < T; ++t) {
            const float* kt = K + t * pos_stride;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t j = 0; j < hd; ++j) acc += qh[j] * kt[j];
            sc[t] = acc * scaling;
            mx = sc[t] > mx ? sc[t] : mx;
        }
        float sum = 0.f;
        for (int64_t t = 0; t < T; ++t) {
            sc[t] = std::exp(sc[t] - mx);
            sum += sc[t];
        }
        float* oh = o.data() + hh * hd;
        for (int64_t j = 0; j < hd; ++j) oh[j] = 0.f;
        for (int64_t t = 0; t < T; ++t) {
            const float p = sc[t] / sum;
            const float* vt = Vv + t * pos_stride;
#pragma omp simd
            for (int64_t j = 0; j < hd; ++j) oh[j] += p * vt[j];
        }
    };
#ifdef _OPENMP
    if (n_threads > 1 && n_heads * T * hd >= (1 << 16)) {
#pragma omp parallel for num_threads(n_threads)
        for (int64_t hh = 0; hh < n_heads; ++hh) head(hh);
    } else
#endif
        for (int64_t hh = 0; hh < n_heads; ++hh) head(hh);
    std::vector<float> xs;
    if (linear_apply(*wo, o.data(), h, n_threads, xs)) return -1;
    for (int64_t i = 0; i < d; ++i) h[i] += x[i];
    rmsnorm(h, d, w_post, eps, xn);
    return 0;
}

// y [T, m] = x [T, k] @ (q [m, k] * scale[:, None]).T (+ bias [m], or NULL): int8 weights, one float32 scale per row,
// float32 activations, accumulation and output; rows split over ``n_threads`` (OpenMP) where there are many.
void llmflash_int8_linear(const float* x, int64_t T, int64_t k, const int8_t* q, const float* scale, const float* bias,
                          int64_t m, float* y, int32_t n_threads) {
    int nt = n_threads > 1 && m >= 256 ? n_threads : 1;
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        {
            const int i = omp_get_thread_num(), n = omp_get_num_threads();
            i8rows(x, T, k, q, scale, bias, y, m, m * i / n, m * (i + 1) / n);
        }
        return;
    }
#endif
    i8rows(x, T, k, q, scale, bias, y, m, 0, m);
}

// y [T, m] = x [T, k] @ W.T (+ bias [m], or NULL): W's m rows group-quantized (``bits`` 8 or 4, ``group_size`` values
// per float16 scale), ``stride`` bytes apart; float32 activations, accumulation and output; rows split over
// ``n_threads`` (OpenMP) where there are many. Returns 0, -1 for other bits, -2 for a group size that does not fit k.
int32_t llmflash_q_linear(const float* x, int64_t T, int64_t k, const void* w, int64_t stride, int32_t bits,
                          int32_t group_size, const float* bias, int64_t m, float* y, int32_t n_threads) {
    if (bits != 8 && bits != 4) return -1;
    if (group_size <= 0 || group_size % 2 || k % group_size) return -2;
    QShape s{k, group_size, k / group_size, k * bits / 8, group_size % (bits == 8 ? W : 2 * W) == 0};
    const uint8_t* wq = static_cast<const uint8_t*>(w);
    std::vector<float> xs_own;
    const float* xs = x;
    if (bits == 4) {  // the kernel's order: each token's even values, then its odd ones
        const int64_t half = k / 2;
        xs_own.resize(static_cast<size_t>(T * k));
        for (int64_t t = 0; t < T; ++t)
            for (int64_t j = 0; j < half; ++j) {
                xs_own[t * k + j] = x[t * k + 2 * j];
                xs_own[t * k + half + j] = x[t * k + 2 * j + 1];
            }
        xs = xs_own.data();
    }
    auto rows = [&](int64_t lo, int64_t hi) {
        if (bits == 8)
            qlinear_rows<8>(xs, T, s, wq, stride, bias, y, m, lo, hi);
        else
            qlinear_rows<4>(xs, T, s, wq, stride, bias, y, m, lo, hi);
    };
    int nt = n_threads > 1 && m >= 256 ? n_threads : 1;
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        {
            const int i = omp_get_thread_num(), n = omp_get_num_threads();
            rows(m * i / n, m * (i + 1) / n);
        }
        return 0;
    }
#endif
    rows(0, m);
    return 0;
}

// Adds the rows' contribution into y [T, d] (float32). x [T, d] float32, contiguous. a, u, down: the first row of
// each part (u NULL for a plain FFN), rows ``stride`` (down: ``stride_down``) elements apart, of weight dtype
// ``dtype``. rows, ids: [n].
// bias: float32 [d_ffn] or NULL. mask: bool [T, mask_stride] or NULL. threshold < 0: none; on_act: the threshold
// compares |act(z)| alone (it must then be >= 0). Returns 0, or -1 for a dtype this build does not support.
int32_t llmflash_sparse_ffn(const float* x, int64_t T, int64_t d, const void* a, const void* u, const void* down,
                            int64_t stride, int64_t stride_down, int32_t dtype, const int64_t* rows, const int64_t* ids, int64_t n,
                            const float* bias, const uint8_t* mask, int64_t mask_stride, int32_t kind,
                            float threshold, int32_t on_act, float* y, int32_t n_threads) {
    switch (dtype) {
        case F32:
            run<F32W>(x, T, d, a, u, down, stride, stride_down, rows, ids, n, bias, mask, mask_stride, kind, threshold, on_act,
                      y, n_threads);
            return 0;
        case BF16:
            run<BF16W>(x, T, d, a, u, down, stride, stride_down, rows, ids, n, bias, mask, mask_stride, kind, threshold, on_act,
                      y, n_threads);
            return 0;
#ifdef __FLT16_MAX__
        case F16:
            run<F16W>(x, T, d, a, u, down, stride, stride_down, rows, ids, n, bias, mask, mask_stride, kind, threshold, on_act,
                      y, n_threads);
            return 0;
#endif
        default:
            return -1;
    }
}

// The same over group-quantized rows (llmflash/quant.py): a, u, down point at the first row's part (its codes; u NULL
// for a plain FFN), rows ``stride`` (down: ``stride_down``) BYTES apart; ``bits`` 8 or 4, ``group_size`` values per
// float16 scale (even, dividing d); ``asym``: bit 0, a's parts are asymmetric int4 (an int8 offset per group after
// the scales), bit 1, u's. Returns 0, -1 for other bits, -2 for a group size that does not fit d, -3 for asymmetric
// parts that are not int4.
int32_t llmflash_sparse_ffn_q(const float* x, int64_t T, int64_t d, const void* a, const void* u, const void* down,
                              int64_t stride, int64_t stride_down, int32_t bits, int32_t group_size, const int64_t* rows,
                              const int64_t* ids, int64_t n, const float* bias, const uint8_t* mask, int64_t mask_stride,
                              int32_t kind, float threshold, int32_t on_act, float* y, int32_t n_threads, int32_t asym) {
    if (bits != 8 && bits != 4) return -1;
    if (group_size <= 0 || group_size % 2 || d % group_size) return -2;
    if (asym && bits != 4) return -3;
    if (n <= 0) return 0;
    QShape s{d, group_size, d / group_size, d * bits / 8, group_size % (bits == 8 ? W : 2 * W) == 0};
    const uint8_t* A = static_cast<const uint8_t*>(a);
    const uint8_t* U = static_cast<const uint8_t*>(u);
    const uint8_t* D = static_cast<const uint8_t*>(down);
    if (bits == 8)
        qrun<8>(x, T, s, A, U, D, stride, stride_down, rows, ids, n, bias, mask, mask_stride, kind, threshold, on_act, y,
                n_threads, 0);
    else
        qrun<4>(x, T, s, A, U, D, stride, stride_down, rows, ids, n, bias, mask, mask_stride, kind, threshold, on_act, y,
                n_threads, asym);
    return 0;
}

}  // extern "C"
