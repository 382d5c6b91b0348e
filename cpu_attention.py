"""
Exact causal attention for narrow heads on the CPU: a small C kernel, compiled once by the machine's
C compiler and called through ctypes. whisper_gpt.causal_attention uses it on the CPU for heads of
at most MAX_HEAD.

Why: at a head size of 8 (GPT-S, and both stacks of the hybrid) attention costs T^2 exponentials per
head and layer for 2 T^2 d multiply-adds of work, so it is bound by its exponentials and by the loop
around them, not by FLOPs. torch's CPU flash kernel runs such a head far below the CPU's speed (it
was 43 % of a GPT-S step, NOTES.md, "Speed of training"). Here one query row at a time sees all of
its keys at once, in order, vectorised over the keys: the scores, their exponentials and the
weighted sum of the values stay in the first-level cache, and the masked half (a key after its
query) is never computed. The backward pass recomputes the probabilities from the saved log-sum-exp,
as flash attention does, so nothing of size T^2 is ever stored.

The same bits on every CPU: every sum runs over 16 fixed lanes in a fixed order, the exponential is
this file's own polynomial, and no multiply-add is fused (-ffp-contract=off), so an AVX2 and an
AVX-512 machine give equal results. Heads are independent, so they are shared among threads (OpenMP)
with no effect on the result.

Without a C compiler (or with WHISPER_GPT_CPU_ATTENTION=0) kernel() returns None and torch's own
call is used.
"""

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile

import torch

# heads up to this size take the kernel (measured faster than torch's at 4, 8 and 16: NOTES.md)
MAX_HEAD = 16

C_SOURCE = r"""
#include <math.h>
#include <stdint.h>

/* 16 float lanes, written with GCC's vector extensions: the compiler maps them onto the machine's
   registers (one AVX-512 register, two AVX2 ones), and every sum has these 16 lanes whatever the
   machine. */
typedef float vf __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi __attribute__((vector_size(64), aligned(4)));
#define L 16

static inline vf splat(float x) { return (vf){0} + x; }

static inline vf select(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* exp(x) for x <= 0: 2^k * p(r), x = k ln2 + r, |r| <= ln2 / 2, p a degree-6 Taylor polynomial
   (rel. error ~2e-7); k by rounding with 1.5 * 2^23; below -87, 0 */
static inline vf vexp(vf x) {
    vi keep = x >= -87.0f;
    x = select(keep, x, splat(-87.0f));
    vf t = x * 1.44269504088896341f + 12582912.0f;
    vf k = t - 12582912.0f;
    vf r = (x - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
    vf p = 1.0f + r * (1.0f + r * (0.5f + r * (0.16666667163372040f + r * (0.041666667908430099f
           + r * (0.0083333337679505348f + r * 0.0013888889225199819f)))));
    vi bits = ((vi)t - (vi)splat(12582912.0f) + 127) << 23;
    return (vf)((vi)(p * (vf)bits) & keep);
}

static inline float hsum(vf a) {  /* a fixed pairwise order */
    float s8[8], s4[4];
    for (int l = 0; l < 8; l++) s8[l] = a[l] + a[l + 8];
    for (int l = 0; l < 4; l++) s4[l] = s8[l] + s8[l + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

static inline float hmax(vf a) {
    float m = a[0];
    for (int l = 1; l < L; l++) m = a[l] > m ? a[l] : m;
    return m;
}

/* s[0..n) = scale * (x_i . y_j) for the d rows of yT (d, tp); n a multiple of L */
static inline void scores(const float *xi, const float *yT, int d, int tp, int n, float scale,
                          float *s) {
    for (int j = 0; j < n; j += L) {
        vf acc = {0};
        for (int c = 0; c < d; c++)
            acc += (xi[c] * scale) * *(const vf *)(yT + (int64_t)c * tp + j);
        *(vf *)(s + j) = acc;
    }
}

/* out[c] = sum_j p_j y_cj for the d rows of yT (d, tp), each over 16 lanes in order */
static inline void row_dots(const float *p, const float *yT, int d, int tp, int n, float *out) {
    for (int c = 0; c < d; c++) {
        vf acc = {0};
        const float *yc = yT + (int64_t)c * tp;
        for (int j = 0; j < n; j += L) acc += *(const vf *)(p + j) * *(const vf *)(yc + j);
        out[c] = hsum(acc);
    }
}

/* s[j] = exp(s[j] - shift) for j <= i, 0 for the masked keys i < j < n */
static inline void exp_masked(float *s, int i, int n, float shift) {
    vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int j = 0; j < n; j += L) {
        vf e = vexp(*(vf *)(s + j) - shift);
        *(vf *)(s + j) = (vf)((vi)e & (lane + j <= i));
    }
}

/* q, o: (heads, t, d); kT, vT: (heads, d, tp), tp = t rounded up to L, zero past t;
   lse: (heads, t); work: threads * 2 * tp floats */
void attn_forward(const float *q, const float *kT, const float *vT, float *o, float *lse,
                  float *work, int heads, int t, int d, int tp, float scale, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int h = 0; h < heads; h++) {
        float *s = work + (int64_t)omp_thread() * 2 * tp;
        const float *qh = q + (int64_t)h * t * d, *kh = kT + (int64_t)h * d * tp,
                    *vh = vT + (int64_t)h * d * tp;
        for (int i = 0; i < t; i++) {
            /* keys 0..i, rounded up to whole lanes; those after i are masked */
            int n = (i / L + 1) * L;
            scores(qh + (int64_t)i * d, kh, d, tp, n, scale, s);
            float m = s[0];
            /* the last, partial lane */
            for (int j = 1; j <= i % L; j++) m = s[n - L + j] > m ? s[n - L + j] : m;
            for (int j = 0; j < n - L; j += L) m = fmaxf(m, hmax(*(vf *)(s + j)));
            exp_masked(s, i, n, m);
            vf acc = {0};
            for (int j = 0; j < n; j += L) acc += *(vf *)(s + j);
            float sum = hsum(acc), *oi = o + ((int64_t)h * t + i) * d;
            row_dots(s, vh, d, tp, n, oi);
            for (int c = 0; c < d; c++) oi[c] /= sum;
            lse[(int64_t)h * t + i] = m + logf(sum);
        }
    }
}

/* gradients: dq (heads, t, d); dkT, dvT (heads, d, tp), zeroed by the caller;
   delta (heads, t) = rowsum(do * o) */
void attn_backward(const float *q, const float *kT, const float *vT, const float *dout,
                   const float *lse, const float *delta, float *dq, float *dkT, float *dvT,
                   float *work, int heads, int t, int d, int tp, float scale, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int h = 0; h < heads; h++) {
        float *p = work + (int64_t)omp_thread() * 2 * tp, *ds = p + tp;
        const float *qh = q + (int64_t)h * t * d, *kh = kT + (int64_t)h * d * tp,
                    *vh = vT + (int64_t)h * d * tp;
        float *dkh = dkT + (int64_t)h * d * tp, *dvh = dvT + (int64_t)h * d * tp;
        for (int i = 0; i < t; i++) {
            int n = (i / L + 1) * L;
            const float *qi = qh + (int64_t)i * d, *doi = dout + ((int64_t)h * t + i) * d;
            float *dqi = dq + ((int64_t)h * t + i) * d;
            scores(qi, kh, d, tp, n, scale, p);
            /* the forward's probabilities, recomputed */
            exp_masked(p, i, n, lse[(int64_t)h * t + i]);
            scores(doi, vh, d, tp, n, 1.0f, ds);  /* dp_j = do_i . v_j */
            vf di = splat(delta[(int64_t)h * t + i]);
            for (int j = 0; j < n; j += L)
                *(vf *)(ds + j) = *(vf *)(p + j) * (*(vf *)(ds + j) - di);
            /* softmax's backward, then the two products */
            row_dots(ds, kh, d, tp, n, dqi);
            for (int c = 0; c < d; c++) dqi[c] *= scale;
            for (int c = 0; c < d; c++) {
                const float qc = qi[c] * scale, gc = doi[c];
                float *dkc = dkh + (int64_t)c * tp, *dvc = dvh + (int64_t)c * tp;
                for (int j = 0; j < n; j += L) {
                    *(vf *)(dkc + j) += *(vf *)(ds + j) * qc;
                    *(vf *)(dvc + j) += *(vf *)(p + j) * gc;
                }
            }
        }
    }
}
"""

FLAGS = [
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fopenmp",
    "-shared",
    "-fPIC",
]
_lib = False  # not yet tried; None once it failed


def _compile():
    """The kernel's shared library, compiled once per source, flags and CPU into a cache folder, or
    None."""
    if os.environ.get("WHISPER_GPT_CPU_ATTENTION", "1") == "0":
        return None
    source = "#include <omp.h>\n#define omp_thread omp_get_thread_num\n" + C_SOURCE
    cpu = torch.backends.cpu.get_cpu_capability()
    key = hashlib.sha256(
        "\n".join([source, " ".join(FLAGS), cpu, sys.platform]).encode()
    ).hexdigest()[:16]
    folder = os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "whisper-gpt"
    )
    path = os.path.join(folder, f"cpu_attention-{key}.so")
    if not os.path.isfile(path):
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryDirectory(
                dir=folder
            ) as tmp:  # compile under a name of our own, then rename
                src, out = os.path.join(tmp, "attn.c"), os.path.join(tmp, "attn.so")
                with open(src, "w") as f:
                    f.write(source)
                subprocess.run(
                    [os.environ.get("CC", "cc"), *FLAGS, src, "-o", out, "-lm"],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
                os.replace(out, path)
        except (OSError, subprocess.SubprocessError) as e:
            print(
                f"cpu_attention: no C kernel ({type(e).__name__}: {str(e)[:200]}); using torch's "
                "attention",
                file=sys.stderr,
            )
            return None
    lib = ctypes.CDLL(path)
    ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.attn_forward.argtypes = [ptr] * 6 + [i32] * 4 + [f32, i32]
    lib.attn_backward.argtypes = [ptr] * 10 + [i32] * 4 + [f32, i32]
    return lib


def kernel():
    """The compiled library (compiled at the first call), or None where there is no C compiler."""
    global _lib
    if _lib is False:
        _lib = _compile()
    return _lib


def _transposed(x, tp):
    """(B, H, T, d) -> (B * H, d, tp) float32, contiguous, zero past T: the layout the kernel reads
    keys in."""
    B, H, T, d = x.shape
    out = x.new_zeros(B * H, d, tp, dtype=torch.float32)
    out[:, :, :T] = x.reshape(B * H, T, d).transpose(1, 2)
    return out


def _ptr(x):
    return ctypes.c_void_p(x.data_ptr())


class NarrowCausalAttention(torch.autograd.Function):
    """softmax(q k^T * scale, causal) v for q, k, v (B, H, T, d) on the CPU, in float32, with its
    exact gradients."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        B, H, T, d = q.shape
        tp, heads, threads = -(-T // 16) * 16, B * H, torch.get_num_threads()
        qc = q.float().reshape(heads, T, d).contiguous()  # (B * H, T, d)
        kT, vT = _transposed(k.float(), tp), _transposed(v.float(), tp)  # (B * H, d, tp)
        o = torch.empty(heads, T, d)
        lse = torch.empty(heads, T)
        work = torch.empty(threads, 2 * tp)
        kernel().attn_forward(
            _ptr(qc),
            _ptr(kT),
            _ptr(vT),
            _ptr(o),
            _ptr(lse),
            _ptr(work),
            heads,
            T,
            d,
            tp,
            scale,
            threads,
        )
        ctx.save_for_backward(qc, kT, vT, o, lse)
        ctx.scale, ctx.shape, ctx.dtypes = scale, q.shape, (q.dtype, k.dtype, v.dtype)
        return o.view(B, H, T, d)

    @staticmethod
    def backward(ctx, grad):
        qc, kT, vT, o, lse = ctx.saved_tensors
        B, H, T, d = ctx.shape
        heads, tp, threads = B * H, kT.size(2), torch.get_num_threads()
        g = grad.float().reshape(heads, T, d).contiguous()  # (B * H, T, d)
        delta = (g * o).sum(-1)  # (B * H, T): rowsum(dO * O), softmax's backward needs it per query
        dq, dkT, dvT = (
            torch.empty(heads, T, d),
            torch.zeros(heads, d, tp),
            torch.zeros(heads, d, tp),
        )
        work = torch.empty(threads, 2 * tp)
        kernel().attn_backward(
            _ptr(qc),
            _ptr(kT),
            _ptr(vT),
            _ptr(g),
            _ptr(lse),
            _ptr(delta),
            _ptr(dq),
            _ptr(dkT),
            _ptr(dvT),
            _ptr(work),
            heads,
            T,
            d,
            tp,
            ctx.scale,
            threads,
        )
        dk = dkT[:, :, :T].transpose(1, 2).reshape(B, H, T, d)  # (B, H, T, d)
        dv = dvT[:, :, :T].transpose(1, 2).reshape(B, H, T, d)
        qt, kt, vt = ctx.dtypes
        return dq.view(B, H, T, d).to(qt), dk.to(kt), dv.to(vt), None


# a foreign call: torch.compile runs it as it is, between the graphs before and after
@torch.compiler.disable
def narrow_causal_attention(q, k, v, scale=None):
    """Causal attention of q, k, v (B, H, T, d) -> (B, H, T, d) float32, on the CPU, by the C
    kernel."""
    return NarrowCausalAttention.apply(q, k, v, q.size(-1) ** -0.5 if scale is None else scale)
