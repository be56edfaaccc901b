// Shared declarations of the kdbench op implementations.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace kdbench {

// Validates the logits / target of kd_loss_fwd and dkd_loss_fwd (every backend).
void check_logits(const at::Tensor& s, const at::Tensor& t, double T);
void check_target(const at::Tensor& target, const at::Tensor& s);

// The dtype the losses accumulate and return in (float for float16 / bfloat16).
at::ScalarType loss_dtype(at::ScalarType logits);

// An uninitialised contiguous tensor shaped like `like`, on huge pages where possible.
at::Tensor empty_like_huge_pages(const at::Tensor& like);

// grad * g for a stored gradient and the incoming scalar gradient g (the losses' backward).
at::Tensor scale_grad_cpu(const at::Tensor& grad, const at::Tensor& g);

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cpu(const at::Tensor& s,
                                                               const at::Tensor& t, double T,
                                                               bool teacher_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor> dkd_loss_fwd_cpu(
    const at::Tensor& s, const at::Tensor& t, const at::Tensor& target, double alpha,
    double beta, double T, bool teacher_grad);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cka_matrix_fwd(
    at::TensorList xs, at::TensorList ys, bool unbiased);
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> cka_matrix_bwd(
    const at::Tensor& grad, at::TensorList xs, at::TensorList ys, const at::Tensor& kx,
    const at::Tensor& ky, const at::Tensor& cka, const at::Tensor& nx, const at::Tensor& ny,
    bool unbiased, bool need_x, bool need_y);

}  // namespace kdbench
