// llmflash's native sparse step: one layer's FFN contribution over a set of cached neuron rows, fused.
//
//   for each row r (neuron ids[r], stored at matrix row rows[r]):
//       z = a[rows[r]] . x[t] + bias[ids[r]]           (a: the gate rows of a gated FFN, else the up rows)
//       h = act(z) * (u[rows[r]] . x[t])               (gated FFN; a plain FFN: h = act(z))
//       h = |h| > threshold ? h : 0                    (threshold rule only)
//       h = mask[t][ids[r]] ? h : 0                    (a gated model's own gate only)
//       y[t] += h * down[rows[r]]                      (skipped when h == 0: a ReLU rule's zeros cost no reads)
//
// The rows are read in place from the neuron cache matrix (any row stride): nothing is gathered or copied, and no
// temporary depends on the number of rows. Rows are split over threads (OpenMP, the runtime torch already loaded:
// same soname), each with its own y, summed at the end. Plain C ABI, loaded with ctypes (no Python headers, no torch
// headers: it builds in about a second with g++ alone).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
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
                float threshold, float* y) {
    for (int64_t r = lo; r < hi; ++r) {
        const int64_t row = rows[r], id = ids[r];
        const typename W::T* ar = a + row * stride;
        const typename W::T* dr = down + row * stride_down;
        const float b = bias ? bias[id] : 0.f;
        for (int64_t t = 0; t < T; ++t) {
            const float* xt = x + t * d;
            float h = act(kind, dot<W>(ar, xt, d) + b);
            if (u) h *= dot<W>(u + row * stride, xt, d);
            if (threshold >= 0.f && !(std::fabs(h) > threshold)) h = 0.f;
            if (mask && !mask[t * mask_stride + id]) h = 0.f;
            if (h == 0.f) continue;
            float* yt = y + t * d;
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) yt[k] += h * W::get(dr, k);
        }
    }
}

template <class W>
void run(const float* x, int64_t T, int64_t d, const void* a, const void* u, const void* down, int64_t stride,
         int64_t stride_down, const int64_t* rows, const int64_t* ids, int64_t n, const float* bias, const uint8_t* mask,
         int64_t mask_stride, int32_t kind, float threshold, float* y, int32_t n_threads) {
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
            rows_range<W>(x, T, d, A, U, D, stride, stride_down, rows, ids, lo, hi, bias, mask, mask_stride, kind, threshold, yi);
        }
        for (int i = 1; i < nt; ++i) {
            const float* p = part.data() + static_cast<size_t>(i - 1) * T * d;
            for (int64_t k = 0; k < T * d; ++k) y[k] += p[k];
        }
        return;
    }
#endif
    rows_range<W>(x, T, d, A, U, D, stride, stride_down, rows, ids, 0, n, bias, mask, mask_stride, kind, threshold, y);
}

}  // namespace

extern "C" {

// Version of this ABI: the loader refuses a library of another version.
int32_t llmflash_step_version() { return 2; }

// Adds the rows' contribution into y [T, d] (float32). x [T, d] float32, contiguous. a, u, down: the first row of
// each part (u NULL for a plain FFN), rows ``stride`` (down: ``stride_down``) elements apart, of weight dtype
// ``dtype``. rows, ids: [n].
// bias: float32 [d_ffn] or NULL. mask: bool [T, mask_stride] or NULL. threshold < 0: none. Returns 0, or -1 for a
// dtype this build does not support.
int32_t llmflash_sparse_ffn(const float* x, int64_t T, int64_t d, const void* a, const void* u, const void* down,
                            int64_t stride, int64_t stride_down, int32_t dtype, const int64_t* rows, const int64_t* ids, int64_t n,
                            const float* bias, const uint8_t* mask, int64_t mask_stride, int32_t kind,
                            float threshold, float* y, int32_t n_threads) {
    switch (dtype) {
        case F32:
            run<F32W>(x, T, d, a, u, down, stride, stride_down, rows, ids, n, bias, mask, mask_stride, kind, threshold, y, n_threads);
            return 0;
        case BF16:
            run<BF16W>(x, T, d, a, u, down, stride, stride_down, rows, ids, n, bias, mask, mask_stride, kind, threshold, y, n_threads);
            return 0;
#ifdef __FLT16_MAX__
        case F16:
            run<F16W>(x, T, d, a, u, down, stride, stride_down, rows, ids, n, bias, mask, mask_stride, kind, threshold, y, n_threads);
            return 0;
#endif
        default:
            return -1;
    }
}

}  // extern "C"
