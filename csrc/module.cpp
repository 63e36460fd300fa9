// The Python extension module: what this copy of maskattn was built against. It includes no torch
// header and holds no operator (those live in libmaskattn_ops.so, built on PyTorch's stable ABI), so
// it ties the wheel to a CPython version only, never to a torch release.
#include <pybind11/pybind11.h>

namespace {

bool built_with_cuda() {
#ifdef MASKATTN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "maskattn build information";
  m.attr("torch_version") = MASKATTN_TORCH_VERSION;
  m.attr("torch_target") = MASKATTN_TORCH_TARGET;
  m.attr("cuda_version") = built_with_cuda() ? MASKATTN_CUDA_VERSION : "";
  m.attr("with_cuda") = built_with_cuda();
}
