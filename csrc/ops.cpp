// The CUDA C++ backend's operators: `fastkd::cuda_<op>`, one schema per op, the schema of its one declaration
// in fastkd/kernel_ops.py (from which both backends register; tests/test_kernel_ops.py checks these strings
// against it). Each op's implementation is the C++ function `fastkd::<op>`, registered beside its kernels
// (TORCH_LIBRARY_IMPL(fastkd, CUDA, ...)); the fake (shape) implementations and autograd are registered from
// Python, by fastkd/kernel_ops.py, as for the Triton ops. The CPU stand-in build defines the same schemas under
// its own library (library.h).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "library.h"

#ifndef FASTKD_ARCHS
#define FASTKD_ARCHS unknown
#endif
#define FASTKD_STRING(x) #x
#define FASTKD_EXPAND_STRING(x) FASTKD_STRING(x)

// What this build holds, for `fastkd info`: the GPU architectures it was compiled for (set by the build).
static std::string cuda_build_info() { return std::string("architectures ") + FASTKD_EXPAND_STRING(FASTKD_ARCHS); }

// TORCH_LIBRARY pastes its argument unexpanded; one more macro level expands FASTKD_LIBRARY first.
#define FASTKD_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

FASTKD_TORCH_LIBRARY(FASTKD_LIBRARY, m) {
  m.def("cuda_build_info() -> str", &cuda_build_info);
  // The logit row losses, each with its weighted gradient made in the same launch (per-row float32 weights,
  // any stride, None = 1; a gradient not asked for is an empty (0,) tensor), and the backward that scales a
  // gradient buffer by grad_output in place (rows whose scale is exactly 1 untouched) -- see fastkd/kernel_ops.py.
  // The temperature is the float, or per row `temperature_rows` (float32 (rows,), any stride; a row's T not > 0
  // gives NaN); `temperature_grad` asks for the last output d_T (float32 (rows,), else empty (0,)): the derivative
  // of each row's weighted terms (CE excluded) by its temperature, -sum_j (GX_j a_j + GY_j b_j) over both sides'
  // weighted gradients and shifted scaled logits, summed in the gradient pass (which then runs without an input
  // gradient too).
  // Per-row KL(p_t || p_s) (reverse: KL(p_s || p_t)), CE(student, target) (empty without target), d_student,
  // d_teacher, d_T -- fastkd/triton/kl.py.
  m.def("cuda_kl_rows(Tensor student, Tensor teacher, float temperature, Tensor? temperature_rows, bool reverse, "
        "Tensor? target, Tensor? labels, int ignore_index, Tensor? kl_weight, Tensor? ce_weight, bool student_grad, "
        "bool teacher_grad, bool temperature_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Per-row generalized JSD for 0 < beta < 1, d_student, d_teacher, d_T -- fastkd/triton/jsd.py.
  m.def("cuda_jsd_rows(Tensor student, Tensor teacher, float beta, float temperature, Tensor? temperature_rows, "
        "Tensor? labels, int ignore_index, Tensor? weight, bool student_grad, bool teacher_grad, "
        "bool temperature_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // Per-row TCKD, NCKD, d_student, d_teacher, d_T -- fastkd/triton/dkd.py.
  m.def("cuda_dkd_rows(Tensor student, Tensor teacher, Tensor target, float temperature, Tensor? temperature_rows, "
        "Tensor? tckd_weight, Tensor? nckd_weight, bool student_grad, bool teacher_grad, bool temperature_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Sparse-teacher KD: per-row loss of the student's logits against k teacher slots (ids, log-probabilities;
  // l = -inf: unused), d_student (weighted, in the forward) -- fastkd/triton/sparse.py.
  m.def("cuda_sparse_kd_rows(Tensor student, Tensor teacher_indices, Tensor teacher_logprobs, str tail, "
        "float temperature, Tensor? labels, int ignore_index, Tensor? weight, bool student_grad) -> (Tensor, Tensor)");
  // Vocabulary-parallel divergences, the per-slice kernels between the collectives -- fastkd/triton/vocab_parallel.py:
  // a slice's per-row (max, sum exp) of x = logits * inv_temperature, (rows, 2) each, column 0 the student; its
  // partial divergence sums (rows, 2) from the global shift and log_total, and forward KL's d_student; the student's
  // gradient of reverse KL / JSD from the global row KL.
  m.def("cuda_vocab_row_stats(Tensor student, Tensor teacher, float inv_temperature) -> (Tensor, Tensor)");
  m.def("cuda_vocab_row_terms(Tensor student, Tensor teacher, float inv_temperature, Tensor shift, Tensor log_total, "
        "str kind, float beta, Tensor? weight, bool student_grad) -> (Tensor, Tensor)");
  m.def("cuda_vocab_row_grad(Tensor student, Tensor teacher, float inv_temperature, Tensor shift, Tensor log_total, "
        "str kind, float beta, Tensor row_kl, Tensor? weight) -> Tensor");
  // d_row *= scale[row] in place -- fastkd/triton/rows.py.
  m.def("cuda_scale_rows_(Tensor(a!) d, Tensor scale) -> ()");
  // RKD: direct squared distances (B, B) of float32 rows (B, D); out_m = sum_k w_mk (x_m - x_k) for a symmetric
  // w (the gradient of anything of the pairwise differences); the Huber sum over the angle triples (i, j != k)
  // from each side's float32 pairs qh + ql of the squared distances computed in float64, and the weights W of
  // its gradient (d/dx_s = weighted_diff(W, x_s)) -- see fastkd/triton/rkd.py.
  m.def("cuda_rkd_sq_distances(Tensor x) -> Tensor");
  m.def("cuda_rkd_weighted_diff(Tensor w, Tensor x) -> Tensor");
  m.def("cuda_rkd_angle_sum(Tensor qh_s, Tensor ql_s, Tensor qh_t, Tensor ql_t, bool unit_s, bool unit_t) -> Tensor");
  m.def("cuda_rkd_angle_weights(Tensor qh_s, Tensor ql_s, Tensor qh_t, Tensor ql_t, bool unit_t) -> Tensor");
  // Attention transfer: mean over channels of f^p, (B, H*W) float32, and its gradient -- see
  // fastkd/triton/attention.py.
  m.def("cuda_at_channel_mean_pow(Tensor f, float p) -> Tensor");
  m.def("cuda_at_channel_mean_pow_backward(Tensor grad, Tensor f, float p) -> Tensor");
}

// `import fastkd._C` loads the operators: a module with no functions, built against Python's stable ABI so
// one build serves every Python version (the operators are reached through torch.ops, not through Python).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
