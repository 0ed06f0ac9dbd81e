// The one place where flashcore's native schemas are declared. Each device's
// implementations register separately (csrc/cpu/*.cpp: CPU, csrc/cuda/*: CUDA).
// The arguments mirror the Python contracts in flashcore/ops/<op>.py.
#include <torch/library.h>

#ifdef FLASHCORE_PYTHON_MODULE
#include <Python.h>
// `import flashcore._C` loads this library, which runs the registrations below;
// the module itself is empty: the ops live under torch.ops.flashcore_C. The
// CMake build (no Python) loads the same code with torch.ops.load_library.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
#endif

TORCH_LIBRARY(flashcore_C, m) {
  // -> (x_next, x0); see flashcore/ops/sampler_step.py
  m.def("sampler_step(Tensor x_t, Tensor eps_c, Tensor? eps_u, Tensor? x_T, float a_t, float s_t, "
        "float a_s, float s_s, float guidance, bool noise_correction, float clip) -> (Tensor, Tensor)");
  // the same, written into caller-owned buffers (which must not alias the inputs)
  m.def("sampler_step_out(Tensor x_t, Tensor eps_c, Tensor? eps_u, Tensor? x_T, float a_t, float s_t, "
        "float a_s, float s_s, float guidance, bool noise_correction, float clip, Tensor(a!) x_next, "
        "Tensor(b!) x0) -> ()");
  // -> (loss, grad_eps); see flashcore/ops/srl_loss.py
  m.def("srl_loss(Tensor x_t, Tensor eps_s, Tensor x0_target, float a_t, float s_t) -> (Tensor, Tensor)");
  // chi = a * x0 + s * noise
  m.def("srl_renoise(Tensor x0, Tensor noise, float a, float s) -> Tensor");
  // act(x W^T + b), act "none" / "gelu" / "gelu_tanh"; see flashcore/ops/linear.py
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor");
  // -> (out, lse); see flashcore/ops/attention.py
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  // -> (dq, dk, dv)
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) "
        "-> (Tensor, Tensor, Tensor)");
}
