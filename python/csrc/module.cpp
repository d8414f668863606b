// The Python module moereg_torch._C: the functions of binding.hpp, nothing else.
#include "binding.hpp"

namespace moereg_torch {

pybind11::dict defaults() {
  pybind11::dict d;
  auto put = [&](const char* op, pybind11::dict o) { d[op] = o; };
  {
    const moereg::load_balancing_config c;
    pybind11::dict o;
    o["coef"] = c.coef;
    put("load_balancing", o);
  }
  {
    const moereg::z_loss_config c;
    pybind11::dict o;
    o["coef"] = c.coef;
    put("z_loss", o);
  }
  {
    const moereg::entropy_config c;
    pybind11::dict o;
    o["coef"] = c.coef;
    put("entropy", o);
  }
  {
    const moereg::importance_config c;
    pybind11::dict o;
    o["coef"] = c.coef;
    put("importance", o);
  }
  {
    const moereg::variance_config c;
    pybind11::dict o;
    o["coef"] = c.coef;
    o["axis"] = c.axis == moereg::variance_axis::tokens ? "tokens" : "experts";
    o["reduction"] = c.reduction == moereg::variance_reduction::mean ? "mean" : "sum";
    put("variance", o);
  }
  {
    const moereg::specialization_config c;
    pybind11::dict o;
    o["coef"] = c.coef;
    o["eps"] = c.eps;
    o["pairs"] = c.pairs == moereg::sp_pairs::sum ? "sum" : "mean";
    put("specialization", o);
  }
  {
    const moereg::orthogonality_config c;
    pybind11::dict o;
    o["coef"] = c.coef;
    o["eps"] = c.eps;
    o["variant"] = c.variant == moereg::ortho_variant::pairwise ? "pairwise" : "subspace";
    o["reduction"] = c.reduction == moereg::ortho_reduction::mean ? "mean" : "sum";
    put("orthogonality", o);
  }
  {
    const moereg::coupling_config c;
    pybind11::dict o;
    o["coef"] = c.coef;
    o["eps"] = c.eps;
    o["form"] =
        c.form == moereg::coupling_form::token ? "token" : (c.form == moereg::coupling_form::log ? "log" : "batch");
    put("coupling", o);
  }
  {
    const moereg::bias_update_config c;
    pybind11::dict o;
    o["rate"] = c.rate;
    o["center"] = c.center;
    put("bias_update", o);
  }
  return d;
}

}  // namespace moereg_torch

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace moereg_torch;
  m.doc() = "moereg's losses on torch tensors (CPU backend); use the moereg_torch package, not this module";
  m.def("load_balancing", &load_balancing);
  m.def("load_balancing_stats", &load_balancing_stats);
  m.def("z_loss", &z_loss);
  m.def("entropy", &entropy);
  m.def("importance", &importance);
  m.def("variance", &variance);
  m.def("specialization", &specialization);
  m.def("orthogonality", &orthogonality);
  m.def("coupling", &coupling);
  m.def("bias_update", &bias_update);
  m.def("defaults", &defaults);
  m.attr("version") = std::to_string(MOEREG_VERSION_MAJOR) + "." + std::to_string(MOEREG_VERSION_MINOR) + "." +
                      std::to_string(MOEREG_VERSION_PATCH);
  m.attr("cuda") = false;
}
