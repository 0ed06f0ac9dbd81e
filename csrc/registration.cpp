// The one place where flashcore's native schemas are declared. Each device's
// implementations register separately (csrc/cpu/*.cpp: CPU, csrc/cuda/*: CUDA).
#include <Python.h>
#include <torch/library.h>

// `import flashcore._C` loads this library, which runs the registrations below;
// the module itself is empty: the ops live under torch.ops.flashcore_C.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(flashcore_C, m) {
  // chi = a * x0 + s * noise (the SRL re-noising), see flashcore/ops/srl_loss.py
  m.def("srl_renoise(Tensor x0, Tensor noise, float a, float s) -> Tensor");
}
