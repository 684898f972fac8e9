/* The per-block work of one Gumbel-mask layer in one pass over its blocks (CPU): `pipeline/masks/fused.py`
 * compiles this file with the system C compiler on first use and calls it through ctypes; without a compiler
 * the PyTorch path of `pipeline/masks/gumbel.py` runs instead (the same computation in ~10 passes).
 *
 * Layouts (nb blocks of m weights; p patterns of n kept among m):
 *   logits, noise:  [p][nb] float32, pattern-major slabs (noise already divided by tau);
 *   weight, out, grad_weight: block-last, block b's m weights at b*m .. b*m+m-1 (a channels_last conv
 *                   weight or a row-major linear one), float32 (elem 4) or bfloat16 (elem 2);
 *   weight_pm:      [m][nb] float32, position-major; kept_scale: the kept-magnitude term's -c / sum|W| (0: off);
 *   keep:           [p][m] uint8, the 0/1 keep row of each pattern; table: [p][m] float32 (table * scale / tau).
 * x_q = noise_q + alpha * logit_q (alpha = scale / tau) is recomputed by the backward rather than stored.
 * Ties go to the first maximal pattern, as torch.argmax.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CHUNK 256
#define MAX_P 70
#define MAX_M 8

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float value;
    memcpy(&value, &bits, 4);
    return value;
}

int gm_limits(int p, int m) { return p >= 1 && p <= MAX_P && m >= 1 && m <= MAX_M; }

/* out[b*m + j] = keep[argmax_q x_q][j] ? weight[b*m + j] : 0 for blocks [begin, end). */
static void forward_range(const float *logits, const float *noise, float alpha, int64_t nb, int p, int m,
                          const uint8_t *keep, const void *weight, void *out, int elem, int64_t begin, int64_t end) {
    int best_index[CHUNK];
    float best[CHUNK];
    for (int64_t b0 = begin; b0 < end; b0 += CHUNK) {
        int count = (int)((end - b0) < CHUNK ? (end - b0) : CHUNK);
        for (int i = 0; i < count; i++) {
            best[i] = noise[b0 + i] + alpha * logits[b0 + i];
            best_index[i] = 0;
        }
        for (int q = 1; q < p; q++) {
            const float *lq = logits + (int64_t)q * nb + b0, *nq = noise + (int64_t)q * nb + b0;
            for (int i = 0; i < count; i++) {
                float x = nq[i] + alpha * lq[i];
                int better = x > best[i];
                best[i] = better ? x : best[i];
                best_index[i] = better ? q : best_index[i];
            }
        }
        if (m == 4 && elem == 2) {  /* a block of four bfloat16 weights is one 64-bit word: mask it at once */
            uint64_t lanes[MAX_P];
            for (int q = 0; q < p; q++) {
                lanes[q] = 0;
                for (int j = 0; j < 4; j++) lanes[q] |= keep[q * 4 + j] ? (uint64_t)0xFFFF << (16 * j) : 0;
            }
            const uint64_t *w = (const uint64_t *)weight + b0;
            uint64_t *o = (uint64_t *)out + b0;
            for (int i = 0; i < count; i++) o[i] = w[i] & lanes[best_index[i]];
            continue;
        }
        for (int i = 0; i < count; i++) {
            const uint8_t *row = keep + best_index[i] * m;
            int64_t base = (b0 + i) * m;
            if (elem == 2) {
                const uint16_t *w = (const uint16_t *)weight + base;
                uint16_t *o = (uint16_t *)out + base;
                for (int j = 0; j < m; j++) o[j] = row[j] ? w[j] : 0;
            } else {
                const uint32_t *w = (const uint32_t *)weight + base;
                uint32_t *o = (uint32_t *)out + base;
                for (int j = 0; j < m; j++) o[j] = row[j] ? w[j] : 0;
            }
        }
    }
}

/* grad_logits[q][b] = soft_q * (g_q - sum_r soft_r g_r), soft = softmax_q(x_q), g_q = sum_j table[q][j] * d_j,
 * d_j = grad_weight[b*m + j] * w + kept_scale * |w|, w = weight_pm[j][b]: the straight-through gradient of
 * softmax(x) @ table, for blocks [begin, end). */
static void backward_range(const float *logits, const float *noise, float alpha, int64_t nb, int p, int m,
                           const float *table, const void *grad_weight, int elem, const float *weight_pm,
                           float kept_scale, float *grad_logits, int64_t begin, int64_t end) {
    float d[MAX_M][CHUNK], e[MAX_P][CHUNK], most[CHUNK], total[CHUNK], dot[CHUNK];
    for (int64_t b0 = begin; b0 < end; b0 += CHUNK) {
        int count = (int)((end - b0) < CHUNK ? (end - b0) : CHUNK);
        if (m == 4 && elem == 2) {  /* four bfloat16 gradients per 64-bit word */
            const uint64_t *gw = (const uint64_t *)grad_weight + b0;
            for (int j = 0; j < 4; j++) {
                const float *wj = weight_pm + (int64_t)j * nb + b0;
                for (int i = 0; i < count; i++) {
                    uint32_t bits = (uint32_t)((gw[i] >> (16 * j)) & 0xFFFF) << 16;
                    float g;
                    memcpy(&g, &bits, 4);
                    d[j][i] = g * wj[i];
                }
                if (kept_scale != 0.0f)
                    for (int i = 0; i < count; i++) d[j][i] += kept_scale * fabsf(wj[i]);
            }
        } else for (int j = 0; j < m; j++) {
            const float *wj = weight_pm + (int64_t)j * nb + b0;
            for (int i = 0; i < count; i++) {
                int64_t at = (b0 + i) * m + j;
                float g = elem == 2 ? bf16_to_float(((const uint16_t *)grad_weight)[at]) : ((const float *)grad_weight)[at];
                d[j][i] = g * wj[i] + kept_scale * fabsf(wj[i]);
            }
        }
        for (int q = 0; q < p; q++) {
            const float *lq = logits + (int64_t)q * nb + b0, *nq = noise + (int64_t)q * nb + b0;
            for (int i = 0; i < count; i++) {
                float x = nq[i] + alpha * lq[i];
                e[q][i] = x;
                most[i] = (q == 0 || x > most[i]) ? x : most[i];
            }
        }
        for (int i = 0; i < count; i++) total[i] = 0.0f, dot[i] = 0.0f;
        for (int q = 0; q < p; q++) {
            for (int i = 0; i < count; i++) {
                float s = expf(e[q][i] - most[i]);
                e[q][i] = s;
                total[i] += s;
            }
        }
        for (int q = 0; q < p; q++) {
            float *out = grad_logits + (int64_t)q * nb + b0;
            if (m == 4) {
                const float t0 = table[q * 4], t1 = table[q * 4 + 1], t2 = table[q * 4 + 2], t3 = table[q * 4 + 3];
                for (int i = 0; i < count; i++) {
                    float g = t0 * d[0][i] + t1 * d[1][i] + t2 * d[2][i] + t3 * d[3][i];
                    out[i] = g;  /* g_q for now */
                    dot[i] += e[q][i] * g;
                }
                continue;
            }
            for (int i = 0; i < count; i++) {
                float g = 0.0f;
                for (int j = 0; j < m; j++) g += table[q * m + j] * d[j][i];
                out[i] = g;  /* g_q for now */
                dot[i] += e[q][i] * g;
            }
        }
        for (int q = 0; q < p; q++) {
            float *out = grad_logits + (int64_t)q * nb + b0;
            for (int i = 0; i < count; i++) {
                float inverse = 1.0f / total[i];
                out[i] = e[q][i] * inverse * (out[i] - dot[i] * inverse);
            }
        }
    }
}

/* Whole chunks per thread of the OpenMP team: loaded after PyTorch, this library shares PyTorch's own libgomp
 * (same soname) and so its threads, which would otherwise spin beside ours (measured: twice the time). */
#define SERIAL_BLOCKS (1 << 15)

void gm_forward(const float *logits, const float *noise, float alpha, int64_t nb, int p, int m,
                const uint8_t *keep, const void *weight, void *out, int elem) {
    int64_t chunks = (nb + CHUNK - 1) / CHUNK;
    #pragma omp parallel for schedule(static) if (nb >= SERIAL_BLOCKS)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t end = (c + 1) * CHUNK < nb ? (c + 1) * CHUNK : nb;
        forward_range(logits, noise, alpha, nb, p, m, keep, weight, out, elem, c * CHUNK, end);
    }
}

void gm_backward(const float *logits, const float *noise, float alpha, int64_t nb, int p, int m,
                 const float *table, const void *grad_weight, int elem, const float *weight_pm, float kept_scale,
                 float *grad_logits) {
    int64_t chunks = (nb + CHUNK - 1) / CHUNK;
    #pragma omp parallel for schedule(static) if (nb >= SERIAL_BLOCKS)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t end = (c + 1) * CHUNK < nb ? (c + 1) * CHUNK : nb;
        backward_range(logits, noise, alpha, nb, p, m, table, grad_weight, elem, weight_pm, kept_scale, grad_logits,
                       c * CHUNK, end);
    }
}
