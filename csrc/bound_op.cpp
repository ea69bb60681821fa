// memboost._C.BoundOp: one of memboost's ops with every argument but the
// first bound, called from Python with one tensor. The decode loop calls a
// *_linear op about 200 times per token (and rms_norm 60); through torch.ops each call parses
// its dozen arguments against the schema in Python and C++ (about 2 us, as
// much as a small layer's kernel). Here they are converted once, at bind
// time, and a call is one boxed dispatcher call: the dispatcher still picks
// the kernel by device, autograd and profiler still see the op.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <string>
#include <vector>

namespace memboost {
namespace {

struct BoundOp {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  // Heap-held C++ state (the object's memory comes from Python's allocator).
  c10::OperatorHandle* op;
  std::vector<c10::IValue>* rest;
  // When set, its result (called on the same x) is the op's last argument:
  // low_rank_linear(x, A, B, base(x)).
  PyObject* inner;
};

at::Tensor call_bound(BoundOp* self, const at::Tensor& x) {
  torch::jit::Stack stack;
  stack.reserve(self->rest->size() + 2);
  stack.emplace_back(x);
  stack.insert(stack.end(), self->rest->begin(), self->rest->end());
  if (self->inner != nullptr) stack.emplace_back(call_bound(reinterpret_cast<BoundOp*>(self->inner), x));
  self->op->callBoxed(stack);
  return std::move(stack.back()).toTensor();
}

PyObject* bound_op_vectorcall(PyObject* callable, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  HANDLE_TH_ERRORS
  auto* self = reinterpret_cast<BoundOp*>(callable);
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  if (nargs != 1 || (kwnames != nullptr && PyTuple_GET_SIZE(kwnames) != 0) || !THPVariable_Check(args[0])) {
    PyErr_Format(PyExc_TypeError, "memboost: a bound %s takes one tensor 'x'",
                 self->op->schema().name().c_str());
    return nullptr;
  }
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = call_bound(self, x);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

void bound_op_dealloc(PyObject* obj) {
  auto* self = reinterpret_cast<BoundOp*>(obj);
  delete self->op;
  delete self->rest;
  Py_XDECREF(self->inner);
  Py_TYPE(obj)->tp_free(obj);
}

PyObject* bound_op_repr(PyObject* obj) {
  auto* self = reinterpret_cast<BoundOp*>(obj);
  return PyUnicode_FromFormat("<memboost bound %s>", self->op->schema().name().c_str());
}

PyObject* bound_op_name(PyObject* obj, void*) {
  return PyUnicode_FromString(reinterpret_cast<BoundOp*>(obj)->op->schema().name().c_str());
}

// The bound arguments back as Python values (for inspection: what a decode loop bound).
PyObject* bound_op_args(PyObject* obj, void*) {
  HANDLE_TH_ERRORS
  const auto& rest = *reinterpret_cast<BoundOp*>(obj)->rest;
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(rest.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < rest.size(); ++i) {
    const c10::IValue& v = rest[i];
    PyObject* item = v.isTensor()  ? THPVariable_Wrap(v.toTensor())
                     : v.isInt()   ? PyLong_FromLongLong(v.toInt())
                     : v.isDouble() ? PyFloat_FromDouble(v.toDouble())
                     : v.isBool()  ? PyBool_FromLong(v.toBool())
                                   : Py_NewRef(Py_None);
    if (item == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), item);
  }
  return out;
  END_HANDLE_TH_ERRORS
}

PyGetSetDef bound_op_getset[] = {
    {"name", bound_op_name, nullptr, "the op's schema name, e.g. memboost::mixed_linear", nullptr},
    {"args", bound_op_args, nullptr, "the bound arguments (every one after x)", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyTypeObject BoundOpType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// One bound argument as the schema types it: a tensor, an optional tensor,
// an int, a float or a bool (what the *_linear ops and rms_norm take).
c10::IValue bound_argument(const c10::Argument& arg, PyObject* value, const std::string& op_name) {
  const auto& type = arg.type();
  const bool optional = type->kind() == c10::TypeKind::OptionalType;
  const auto& base = optional ? type->castRaw<c10::OptionalType>()->getElementType() : type;
  if (optional && value == Py_None) return c10::IValue();
  if (base->kind() == c10::TypeKind::TensorType && THPVariable_Check(value)) return THPVariable_Unpack(value);
  if (base->kind() == c10::TypeKind::IntType && PyLong_Check(value) && !PyBool_Check(value)) {
    const long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred()) throw python_error();
    return c10::IValue(static_cast<int64_t>(v));
  }
  if (base->kind() == c10::TypeKind::FloatType && (PyFloat_Check(value) || (PyLong_Check(value) && !PyBool_Check(value)))) {
    const double v = PyFloat_AsDouble(value);
    if (v == -1.0 && PyErr_Occurred()) throw python_error();
    return c10::IValue(v);
  }
  if (base->kind() == c10::TypeKind::BoolType && PyBool_Check(value)) return c10::IValue(value == Py_True);
  throw c10::TypeError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
                       "memboost: bind_op(" + op_name + "): argument '" + arg.name() + "' must be " +
                           type->str() + ", got " + Py_TYPE(value)->tp_name);
}

// bind_op(name, args, inner=None): `name` a schema ("memboost::mixed_linear",
// overload "default"), `args` every argument after the first.
PyObject* bind_op(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  const char* name = nullptr;
  PyObject* bound = nullptr;
  PyObject* inner = Py_None;
  if (!PyArg_ParseTuple(args, "sO!|O", &name, &PyTuple_Type, &bound, &inner)) return nullptr;
  auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK_VALUE(handle.has_value(), "memboost: bind_op: no operator named '", name, "'");
  const auto& schema = handle->schema();
  const auto& arguments = schema.arguments();
  const Py_ssize_t n_bound = PyTuple_GET_SIZE(bound);
  const Py_ssize_t n_last = inner == Py_None ? 0 : 1;
  TORCH_CHECK_VALUE(inner == Py_None || Py_TYPE(inner) == &BoundOpType,
                    "memboost: bind_op: 'inner' must be a bound op or None");
  TORCH_CHECK_VALUE(!arguments.empty() && arguments[0].type()->kind() == c10::TypeKind::TensorType &&
                        static_cast<Py_ssize_t>(arguments.size()) == 1 + n_bound + n_last &&
                        schema.returns().size() == 1 &&
                        schema.returns()[0].type()->kind() == c10::TypeKind::TensorType,
                    "memboost: bind_op(", name, "): the schema ", schema,
                    " does not take a tensor and the ", n_bound + n_last, " arguments given, returning one tensor");
  auto rest = std::make_unique<std::vector<c10::IValue>>();
  for (Py_ssize_t i = 0; i < n_bound; ++i)
    rest->push_back(bound_argument(arguments[i + 1], PyTuple_GET_ITEM(bound, i), name));
  auto* self = PyObject_New(BoundOp, &BoundOpType);
  if (self == nullptr) return nullptr;
  self->vectorcall = bound_op_vectorcall;
  self->op = new c10::OperatorHandle(*handle);
  self->rest = rest.release();
  Py_XINCREF(n_last ? inner : nullptr);
  self->inner = n_last ? inner : nullptr;
  return reinterpret_cast<PyObject*>(self);
  END_HANDLE_TH_ERRORS
}

PyMethodDef module_methods[] = {
    {"bind_op", bind_op, METH_VARARGS,
     "bind_op(name, args, inner=None) -> BoundOp: x -> op(x, *args[, inner(x)])"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Called by PyInit__C.
int add_bound_op(PyObject* module) {
  BoundOpType.tp_name = "memboost._C.BoundOp";
  BoundOpType.tp_basicsize = sizeof(BoundOp);
  BoundOpType.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL;
  BoundOpType.tp_vectorcall_offset = offsetof(BoundOp, vectorcall);
  BoundOpType.tp_call = PyVectorcall_Call;
  BoundOpType.tp_dealloc = bound_op_dealloc;
  BoundOpType.tp_repr = bound_op_repr;
  BoundOpType.tp_getset = bound_op_getset;
  BoundOpType.tp_doc = "A memboost op with every argument but x bound (memboost._C.bind_op).";
  if (PyType_Ready(&BoundOpType) < 0) return -1;
  Py_INCREF(&BoundOpType);
  if (PyModule_AddObject(module, "BoundOp", reinterpret_cast<PyObject*>(&BoundOpType)) < 0) return -1;
  return PyModule_AddFunctions(module, module_methods);
}

}  // namespace memboost
