// The schemas of every compiled op (namespace rlhf_fast_C) and their CPU kernels. The CUDA extension adds
// CUDA kernels to the same schemas. The public, validated ops live in Python (namespace rlhf_fast).
#include <Python.h>
#include <torch/library.h>

#include "../cpu/logprobs.h"

TORCH_LIBRARY(rlhf_fast_C, m) {
  m.def("logprobs_fwd(Tensor logits, Tensor? labels, Tensor? kept_threshold, float temperature, int ignore_index,"
        " bool compute_entropy) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("logprobs_bwd(Tensor grad_logp, Tensor grad_entropy, Tensor grad_lse, Tensor? grad_lse_kept, Tensor logits,"
        " Tensor? labels, Tensor? kept_threshold, Tensor lse, Tensor? lse_kept, Tensor entropy, float temperature,"
        " int ignore_index) -> Tensor");
  m.def("logprobs_bwd_into(Tensor grad_logp, Tensor grad_entropy, Tensor grad_lse, Tensor? grad_lse_kept,"
        " Tensor logits, Tensor? labels, Tensor? kept_threshold, Tensor lse, Tensor? lse_kept, Tensor entropy,"
        " float temperature, int ignore_index, Tensor(a!) out) -> ()");
  m.def("kl_div_fwd(Tensor logits, Tensor ref_logits, float temperature)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("kl_div_bwd(Tensor grad_kl, Tensor logits, Tensor ref_logits, Tensor max_p, Tensor max_q, Tensor log_s_p,"
        " Tensor mean_d, float temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) {
  m.impl("logprobs_fwd", &rlhf_fast::cpu::logprobs_fwd_cpu);
  m.impl("logprobs_bwd", &rlhf_fast::cpu::logprobs_bwd_cpu);
  m.impl("logprobs_bwd_into", &rlhf_fast::cpu::logprobs_bwd_into_cpu);
  m.impl("kl_div_fwd", &rlhf_fast::cpu::kl_div_fwd_cpu);
  m.impl("kl_div_bwd", &rlhf_fast::cpu::kl_div_bwd_cpu);
}

// Importing rlhf_fast._C loads this library, which registers the ops above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "rlhf_fast compiled CPU kernels", -1, nullptr};
  return PyModule_Create(&module);
}
