// The kdbench torch.library namespace: op schemas, CPU kernels and the Python module stub
// that makes `import kdbench._C` load this library (and run the registrations).
#include <Python.h>
#include <torch/library.h>

#include "kd_ops.h"

TORCH_LIBRARY(kdbench, m) {
  m.def("kd_loss_fwd(Tensor s, Tensor t, float T, bool teacher_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dkd_loss_fwd(Tensor s, Tensor t, Tensor target, float alpha, float beta, float T, "
      "bool teacher_grad) -> (Tensor, Tensor, Tensor)");
  m.def("scale_grad(Tensor grad, Tensor g) -> Tensor");
  m.def(
      "cka_matrix_fwd(Tensor[] xs, Tensor[] ys, bool unbiased) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cka_matrix_bwd(Tensor grad, Tensor[] xs, Tensor[] ys, Tensor kx, Tensor ky, Tensor cka, "
      "Tensor nx, Tensor ny, bool unbiased, bool need_x, bool need_y) -> (Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(kdbench, CPU, m) {
  m.impl("kd_loss_fwd", &kdbench::kd_loss_fwd_cpu);
  m.impl("dkd_loss_fwd", &kdbench::dkd_loss_fwd_cpu);
  m.impl("scale_grad", &kdbench::scale_grad_cpu);
  m.impl("cka_matrix_fwd", &kdbench::cka_matrix_fwd);
  m.impl("cka_matrix_bwd", &kdbench::cka_matrix_bwd);
}

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "kdbench fused ops (see torch.ops.kdbench)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
