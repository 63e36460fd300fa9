// The Python extension module. The operators themselves register through TORCH_LIBRARY_FRAGMENT
// blocks in the op files; this module only exists so that importing it loads them, and so that
// users can ask what this copy of maskattn was built against.
#include <torch/extension.h>

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
  m.doc() = "maskattn compiled operators";
  m.attr("torch_version") = MASKATTN_TORCH_VERSION;
  m.attr("cuda_version") = built_with_cuda() ? MASKATTN_CUDA_VERSION : "";
  m.attr("with_cuda") = built_with_cuda();
}
