// onnxruntime custom-op library for hqexport::HQQMatMul and the HQQMatMulNBits ops (docs/kernels.md).
//
// RegisterCustomOps adds domain "hqexport" with op HQQMatMul for CPUExecutionProvider (and CUDAExecutionProvider
// when built with HQEXPORT_WITH_CUDA), and HQQMatMulNBits, HQQMatMulNBitsLoRA and their SwiGLU forms (fp32,
// ops/nbits.py), HalfMatMul (ops/half.py) and GridShortlist (ops/shortlist.py) for CPUExecutionProvider. HQQMatMul
// gets two overloads per EP, A fp32 and A fp16, so onnxruntime can infer the output type; the other inputs are left
// untyped and checked here. Every problem with a node (attributes, dtypes, shapes) comes back as an error status,
// never an exception across the C boundary.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "problem.h"
#include "shortlist.h"

#define HQX_EXPORT extern "C" __attribute__((visibility("default")))

namespace hqx {

#ifdef HQEXPORT_WITH_CUDA
// cuda/hqq_matmul.cu: launches the kernel on `stream`; returns an error message or nullptr.
const char* cuda_matmul(const Problem& p, void* stream);
#endif

namespace {

constexpr const char* kDomain = "hqexport";

struct Attrs {
  int64_t N = 0, K = 0, bits = 0, group_size = 0, axis = 1;
  int64_t accuracy_level = 0;  // HQQMatMulNBits[LoRA], optional: MatMulNBits' (4 allows int8 activations)
  int64_t compute_dtype = 1;   // HQQMatMulNBits[LoRA], optional: HQQ's compute dtype (1 float, 10 float16, 16 bfloat16)
  std::vector<int64_t> lora_columns;  // HQQMatMulNBitsLoRA: [start, stop) of each segment's output columns
};

OrtStatusPtr error(const char* op_type, const std::string& node, const std::string& message) {
  const std::string text = std::string("hqexport::") + op_type + " node '" + node + "': " + message;
  return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, text.c_str());
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

// Attribute checks, at session creation.
std::string check_attrs(const Attrs& a) {
  if (a.N <= 0 || a.K <= 0) return "N and K must be positive";
  if (word_bytes(a.bits) == 0) return "bits must be 1, 2, 3, 4 or 8, got " + std::to_string(a.bits);
  if (a.axis != 0 && a.axis != 1) return "axis must be 0 or 1, got " + std::to_string(a.axis);
  if (a.group_size <= 0 || (a.N * a.K) % a.group_size != 0) {
    return "group_size " + std::to_string(a.group_size) + " does not divide N*K = " + std::to_string(a.N * a.K);
  }
  return "";
}

bool is_act(ONNXTensorElementDataType t) {
  return t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

bool is_meta(ONNXTensorElementDataType t) {
  return is_act(t) || t == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
}

// A's checks, shared by both ops: fills p.M, p.A, p.act and Y's shape; returns an error message or "".
std::string describe_activations(Ort::ConstValue A, const Attrs& a, Problem& p, std::vector<int64_t>& y_shape) {
  const auto a_info = A.GetTensorTypeAndShapeInfo();
  const auto a_type = a_info.GetElementType();
  const auto a_shape = a_info.GetShape();
  if (!is_act(a_type)) return "A must be float or float16";
  if (a_shape.empty() || a_shape.back() != a.K) return "A of shape " + shape_text(a_shape) + " does not end in K = " + std::to_string(a.K);
  p.M = static_cast<int64_t>(a_info.GetElementCount()) / a.K;
  p.A = A.GetTensorRawData();
  p.act = static_cast<DType>(a_type);
  y_shape.assign(a_shape.begin(), a_shape.end());
  y_shape.back() = a.N;
  return "";
}

// Checks one input's dtype and shape; returns an error message or "".
std::string check_input(Ort::ConstValue value, const char* name, ONNXTensorElementDataType type, const char* type_name,
                        const std::vector<int64_t>& shape) {
  const auto info = value.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != type) return std::string(name) + " must be " + type_name;
  if (info.GetShape() != shape) return std::string(name) + " of shape " + shape_text(info.GetShape()) + " is not " + shape_text(shape);
  return "";
}

// HQQMatMul: checks the inputs against the attributes and fills `p` (all but Y); returns an error message or "".
std::string describe_hqq(Ort::KernelContext& ctx, const Attrs& a, bool /*checked*/, Problem& p, std::vector<int64_t>& y_shape) {
  const size_t count = ctx.GetInputCount();
  if (count < 4 || count > 5) return "expects 4 or 5 inputs, got " + std::to_string(count);
  Ort::ConstValue A = ctx.GetInput(0), W = ctx.GetInput(1), scale = ctx.GetInput(2), zero = ctx.GetInput(3);
  Ort::ConstValue bias = count == 5 ? ctx.GetInput(4) : Ort::ConstValue{nullptr};
  if (A == nullptr || W == nullptr || scale == nullptr || zero == nullptr) return "A, W, scale and zero are required";
  const std::string activations = describe_activations(A, a, p, y_shape);
  if (!activations.empty()) return activations;
  const auto a_type = static_cast<ONNXTensorElementDataType>(p.act);

  const auto w_info = W.GetTensorTypeAndShapeInfo();
  const auto w_type = w_info.GetElementType();
  const auto w_shape = w_info.GetShape();
  const bool wide = word_bytes(a.bits) == 4;
  const auto w_expected = wide ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  if (w_type != w_expected) return std::string("W must be ") + (wide ? "uint32" : "uint8") + " for bits " + std::to_string(a.bits);
  const int64_t words = (a.K + codes_per_word(a.bits) - 1) / codes_per_word(a.bits);
  if (w_shape != std::vector<int64_t>{a.N, words}) {
    return "W of shape " + shape_text(w_shape) + " does not hold N x K = " + std::to_string(a.N) + " x " +
           std::to_string(a.K) + " codes of " + std::to_string(a.bits) + " bits (expected " +
           shape_text({a.N, words}) + ")";
  }

  const int64_t groups = a.N * a.K / a.group_size;
  const std::vector<int64_t> meta_shape = a.axis == 1 ? std::vector<int64_t>{groups, 1} : std::vector<int64_t>{1, groups};
  const auto s_info = scale.GetTensorTypeAndShapeInfo();
  const auto z_info = zero.GetTensorTypeAndShapeInfo();
  if (!is_meta(s_info.GetElementType())) return "scale must be float, float16 or bfloat16";
  if (z_info.GetElementType() != s_info.GetElementType()) return "zero must have scale's dtype";
  for (const auto* info : {&s_info, &z_info}) {
    if (info->GetShape() != meta_shape) {
      return std::string(info == &s_info ? "scale" : "zero") + " of shape " + shape_text(info->GetShape()) +
             " is not " + shape_text(meta_shape) + " (N*K/group_size groups, axis " + std::to_string(a.axis) + ")";
    }
  }

  if (bias != nullptr) {
    const auto b_info = bias.GetTensorTypeAndShapeInfo();
    if (b_info.GetElementType() != a_type) return "bias must have A's dtype";
    if (b_info.GetShape() != std::vector<int64_t>{a.N}) return "bias of shape " + shape_text(b_info.GetShape()) + " is not [N]";
    p.bias = bias.GetTensorRawData();
  }

  p.N = a.N;
  p.K = a.K;
  p.group_size = a.group_size;
  p.groups = groups;
  p.row_words = words;
  p.bits = static_cast<int>(a.bits);
  p.axis = static_cast<int>(a.axis);
  p.meta = static_cast<DType>(s_info.GetElementType());
  p.W = W.GetTensorRawData();
  p.scale = scale.GetTensorRawData();
  p.zero = zero.GetTensorRawData();
  return "";
}

constexpr auto kU8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr auto kF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
constexpr auto kBF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;

int64_t zero_point_row_bytes(const Attrs& a) { return (a.K / a.group_size * a.bits + 7) / 8; }

// HQQMatMulNBits' scales, zero points and correction against the attributes; an error message or "".
std::string check_nbits_meta(Ort::ConstValue scales, Ort::ConstValue zero_points, Ort::ConstValue correction, const Attrs& a) {
  const int64_t blocks = a.K / a.group_size;
  for (const std::string& message : {check_input(scales, "scales", kF32, "float", {a.N * blocks}),
                                     check_input(zero_points, "zero_points", kU8, "uint8", {a.N * zero_point_row_bytes(a)}),
                                     check_input(correction, "zero_correction", kF32, "float", {blocks, a.N})}) {
    if (!message.empty()) return message;
  }
  return "";
}

// HQQMatMulNBits' B, scales, zero points, group sums and correction (inputs 1 to 5) against the attributes; an
// error message or "".
std::string check_nbits_weights(Ort::ConstValue B, Ort::ConstValue scales, Ort::ConstValue zero_points, Ort::ConstValue group_sum,
                                Ort::ConstValue correction, const Attrs& a) {
  const int64_t blocks = a.K / a.group_size;
  for (const std::string& message : {check_input(B, "B", kU8, "uint8", {a.N, blocks, a.group_size * a.bits / 8}),
                                     check_nbits_meta(scales, zero_points, correction, a),
                                     check_input(group_sum, "group_sum", kF32, "float", {a.K, blocks})}) {
    if (!message.empty()) return message;
  }
  return "";
}

// The inputs HQQMatMulNBits and HQQMatMulNBitsLoRA share, 0 to 5. `checked`: inputs 1 to 5 are initializers that
// passed check_nbits_weights when the kernel was created (constant_zeros), so only A is checked per call.
std::string describe_nbits_inputs(Ort::KernelContext& ctx, const Attrs& a, bool checked, Problem& p, std::vector<int64_t>& y_shape) {
  for (size_t i = 0; i < ctx.GetInputCount(); ++i) {
    if (ctx.GetInput(i) == nullptr) return "every input is required (A, B, scales, zero_points, group_sum, zero_correction[, lora_A, lora_B])";
  }
  const std::string activations = describe_activations(ctx.GetInput(0), a, p, y_shape);
  if (!activations.empty()) return activations;
  if (p.act != DType::F32) return "A must be float";
  if (!checked) {
    const std::string message = check_nbits_weights(ctx.GetInput(1), ctx.GetInput(2), ctx.GetInput(3), ctx.GetInput(4), ctx.GetInput(5), a);
    if (!message.empty()) return message;
  }
  const int64_t blocks = a.K / a.group_size;
  p.N = a.N;
  p.K = a.K;
  p.group_size = a.group_size;
  p.groups = a.N * blocks;
  p.row_words = a.K * a.bits / 8;
  p.bits = static_cast<int>(a.bits);
  p.axis = 1;
  p.meta = DType::F32;
  p.W = ctx.GetInput(1).GetTensorRawData();
  p.scale = ctx.GetInput(2).GetTensorRawData();
  p.zero_points = static_cast<const uint8_t*>(ctx.GetInput(3).GetTensorRawData());
  p.correction = static_cast<const float*>(ctx.GetInput(5).GetTensorRawData());
  p.zp_row_bytes = zero_point_row_bytes(a);
  p.accuracy_level = a.accuracy_level;
  return "";
}

// HQQMatMulNBits (ops/nbits.py): the same checks for (A, B, scales, zero_points, group_sum, zero_correction), fp32.
std::string describe_nbits(Ort::KernelContext& ctx, const Attrs& a, bool checked, Problem& p, std::vector<int64_t>& y_shape) {
  const size_t count = ctx.GetInputCount();
  if (count != 6) return "expects 6 inputs, got " + std::to_string(count);
  return describe_nbits_inputs(ctx, a, checked, p, y_shape);
}

// HQQMatMulNBitsLoRA: HQQMatMulNBits' inputs, then lora_A [segments * r, K] and lora_B [sum of widths, r], both
// fp32 or both fp16.
std::string describe_nbits_lora(Ort::KernelContext& ctx, const Attrs& a, bool checked, Problem& p, std::vector<int64_t>& y_shape) {
  const size_t count = ctx.GetInputCount();
  if (count != 8) return "expects 8 inputs, got " + std::to_string(count);
  const std::string message = describe_nbits_inputs(ctx, a, checked, p, y_shape);
  if (!message.empty()) return message;
  const int64_t segments = static_cast<int64_t>(a.lora_columns.size() / 2);
  int64_t columns = 0;
  for (int64_t s = 0; s < segments; ++s) columns += a.lora_columns[2 * s + 1] - a.lora_columns[2 * s];
  const auto a_shape = ctx.GetInput(6).GetTensorTypeAndShapeInfo().GetShape();
  if (a_shape.size() != 2 || a_shape[0] % segments != 0) {
    return "lora_A of shape " + shape_text(a_shape) + " is not [" + std::to_string(segments) + " * rank, K]";
  }
  const int64_t rank = a_shape[0] / segments;
  const auto type = ctx.GetInput(6).GetTensorTypeAndShapeInfo().GetElementType();
  if (type != kF32 && type != kF16) return "lora_A must be float or float16";
  const char* type_name = type == kF32 ? "float (lora_A's dtype)" : "float16 (lora_A's dtype)";
  for (const std::string& error : {check_input(ctx.GetInput(6), "lora_A", type, type_name, {segments * rank, a.K}),
                                   check_input(ctx.GetInput(7), "lora_B", type, type_name, {columns, rank})}) {
    if (!error.empty()) return error;
  }
  p.lora_A = ctx.GetInput(6).GetTensorRawData();
  p.lora_B = ctx.GetInput(7).GetTensorRawData();
  p.lora_dtype = static_cast<DType>(type);
  p.lora_columns = a.lora_columns.data();
  p.lora_segments = segments;
  p.lora_rank = rank;
  return "";
}

// HalfMatMul (ops/half.py): A [..., K] float and W [N, K] float16 or bfloat16.
std::string describe_half(Ort::KernelContext& ctx, const Attrs& a, bool /*checked*/, Problem& p, std::vector<int64_t>& y_shape) {
  const size_t count = ctx.GetInputCount();
  if (count != 2) return "expects 2 inputs, got " + std::to_string(count);
  if (ctx.GetInput(0) == nullptr || ctx.GetInput(1) == nullptr) return "A and W are required";
  const std::string activations = describe_activations(ctx.GetInput(0), a, p, y_shape);
  if (!activations.empty()) return activations;
  if (p.act != DType::F32) return "A must be float";
  const auto type = ctx.GetInput(1).GetTensorTypeAndShapeInfo().GetElementType();
  if (type != kF16 && type != kBF16) return "W must be float16 or bfloat16";
  const std::string shape = check_input(ctx.GetInput(1), "W", type, type == kF16 ? "float16" : "bfloat16", {a.N, a.K});
  if (!shape.empty()) return shape;
  p.N = a.N;
  p.K = a.K;
  p.W = ctx.GetInput(1).GetTensorRawData();
  p.half_dtype = static_cast<DType>(type);
  return "";
}

std::string check_half_attrs(const Attrs& a) { return a.N > 0 && a.K > 0 ? "" : "N and K must be positive"; }

std::string check_nbits_attrs(const Attrs& a) {
  if (a.N <= 0 || a.K <= 0) return "N and K must be positive";
  if (a.bits != 2 && a.bits != 4 && a.bits != 8) return "bits must be 2, 4 or 8, got " + std::to_string(a.bits);
  if (a.group_size < 16 || (a.group_size & (a.group_size - 1)) != 0 || a.K % a.group_size != 0) {
    return "block_size " + std::to_string(a.group_size) + " is not a power of 2 >= 16 dividing K = " + std::to_string(a.K);
  }
  if (a.accuracy_level < 0 || a.accuracy_level > 4) return "accuracy_level must be 0 to 4, got " + std::to_string(a.accuracy_level);
  if (a.compute_dtype != 1 && a.compute_dtype != 10 && a.compute_dtype != 16) {
    return "compute_dtype must be 1 (float), 10 (float16) or 16 (bfloat16), got " + std::to_string(a.compute_dtype);
  }
  return "";
}

std::string check_nbits_lora_attrs(const Attrs& a) {
  const std::string nbits = check_nbits_attrs(a);
  if (!nbits.empty()) return nbits;
  const auto& columns = a.lora_columns;
  if (columns.empty() || columns.size() % 2 != 0) return "lora_columns must hold [start, stop) pairs";
  for (size_t i = 0; i < columns.size(); i += 2) {
    const int64_t floor = i == 0 ? 0 : columns[i - 1];
    if (columns[i] < floor || columns[i + 1] <= columns[i] || columns[i + 1] > a.N) {
      return "lora_columns must be ascending, non-empty, disjoint ranges within N = " + std::to_string(a.N);
    }
  }
  return "";
}

// The SwiGLU ops halve N: the gate's columns, then the up projection's.
std::string check_even_n(const Attrs& a, std::string (*check)(const Attrs&)) {
  const std::string message = check(a);
  if (!message.empty()) return message;
  return a.N % 2 == 0 ? "" : "N must be even (gate columns, then as many up columns), got " + std::to_string(a.N);
}

std::string check_nbits_swiglu_attrs(const Attrs& a) { return check_even_n(a, &check_nbits_attrs); }
std::string check_nbits_lora_swiglu_attrs(const Attrs& a) { return check_even_n(a, &check_nbits_lora_attrs); }

// What distinguishes the ops: name, attributes (onnx name -> Attrs field), checks, inputs.
struct OpSpec {
  const char* op_type;
  std::vector<std::pair<const char*, int64_t Attrs::*>> attributes;
  std::vector<std::pair<const char*, int64_t Attrs::*>> optional;  // left at their defaults when absent
  std::string (*check)(const Attrs&);
  std::string (*describe)(Ort::KernelContext&, const Attrs&, bool checked, Problem&, std::vector<int64_t>&);
  size_t inputs;
  size_t optional_from;  // inputs from this index on are optional
  bool lora;             // reads the int list attribute lora_columns
  bool swiglu;           // Y = silu(first half of the product's columns) * second half: [..., N / 2]
  bool half = false;     // HalfMatMul: W is a plain float16/bfloat16 matrix, no codes
};

const OpSpec kHqqSpec{"HQQMatMul",
                      {{"N", &Attrs::N}, {"K", &Attrs::K}, {"bits", &Attrs::bits}, {"group_size", &Attrs::group_size}, {"axis", &Attrs::axis}},
                      {},
                      &check_attrs, &describe_hqq, 5, 4, false, false};

const std::vector<std::pair<const char*, int64_t Attrs::*>> kNbitsAttributes{
    {"N", &Attrs::N}, {"K", &Attrs::K}, {"bits", &Attrs::bits}, {"block_size", &Attrs::group_size}};
const std::vector<std::pair<const char*, int64_t Attrs::*>> kNbitsOptional{{"accuracy_level", &Attrs::accuracy_level},
                                                                           {"compute_dtype", &Attrs::compute_dtype}};

const OpSpec kNbitsSpec{"HQQMatMulNBits", kNbitsAttributes, kNbitsOptional, &check_nbits_attrs, &describe_nbits, 6, 6, false, false};
const OpSpec kNbitsLoraSpec{"HQQMatMulNBitsLoRA", kNbitsAttributes, kNbitsOptional, &check_nbits_lora_attrs, &describe_nbits_lora, 8, 8, true, false};
const OpSpec kNbitsSwigluSpec{"HQQMatMulNBitsSwiGLU", kNbitsAttributes, kNbitsOptional, &check_nbits_swiglu_attrs, &describe_nbits, 6, 6, false, true};
const OpSpec kNbitsLoraSwigluSpec{"HQQMatMulNBitsLoRASwiGLU", kNbitsAttributes, kNbitsOptional, &check_nbits_lora_swiglu_attrs,
                                  &describe_nbits_lora, 8, 8, true, true};

const OpSpec kHalfSpec{"HalfMatMul", {{"N", &Attrs::N}, {"K", &Attrs::K}}, {}, &check_half_attrs, &describe_half, 2, 2, false, false, true};

bool cpu_has_avx2() {
#if defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

// Tasks in at most kBatches contiguous batches, each run by one thread: a thread then streams its rows of W from
// memory in order, where one task at a time would interleave the threads' rows (a decode step 1.07-1.1x faster on
// SmolLM2 in an interleaved A/B, 7 of 9 rounds), and up to kBatches threads still share a layer.
constexpr size_t kBatches = 16;

void ort_parallel_for(void* ctx, void (*fn)(void*, size_t), size_t total, void* data) {
  const size_t batches = total < kBatches ? total : kBatches;
  Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(static_cast<OrtKernelContext*>(ctx), fn, total, batches, data));
}

template <typename Kernel>
OrtStatusPtr compute(Kernel& kernel, OrtKernelContext* context) {
  const char* op_type = kernel.spec->op_type;
  try {
    Ort::KernelContext ctx(context);
    Problem p;
    std::vector<int64_t> y_shape;
    const std::string message = kernel.spec->describe(ctx, kernel.attrs, kernel.checked(), p, y_shape);
    if (!message.empty()) return error(op_type, kernel.node, message);
    if (kernel.spec->swiglu) y_shape.back() /= 2;
    auto Y = ctx.GetOutput(0, y_shape);
    p.Y = Y.GetTensorMutableRawData();
    if (p.M == 0) return nullptr;
    const std::string failure = kernel.run(ctx, p);
    return failure.empty() ? nullptr : error(op_type, kernel.node, failure);
  } catch (const std::exception& e) {
    return error(op_type, kernel.node, e.what());
  }
}

// HQQMatMulNBits whose inputs 1 to 5 are initializers (as convert writes them) that pass check_nbits_weights: HQQ's
// zeros (nbits_zeros), computed once when the kernel is created, so that each call runs exactly as HQQMatMul does
// and checks A alone. Empty when an input is not constant or not of the expected shape (describe_nbits then checks
// them, and reports the problem, on every call).
std::vector<float> constant_zeros(const Ort::ConstKernelInfo& info, const Attrs& a) {
  int constant[5] = {0, 0, 0, 0, 0};
  const Ort::ConstValue B = info.GetTensorConstantInput(1, &constant[0]);
  const Ort::ConstValue scales = info.GetTensorConstantInput(2, &constant[1]);
  const Ort::ConstValue zero_points = info.GetTensorConstantInput(3, &constant[2]);
  const Ort::ConstValue group_sum = info.GetTensorConstantInput(4, &constant[3]);
  const Ort::ConstValue correction = info.GetTensorConstantInput(5, &constant[4]);
  for (const int is_constant : constant) {
    if (!is_constant) return {};
  }
  if (!check_nbits_weights(B, scales, zero_points, group_sum, correction, a).empty()) return {};
  Problem p;
  p.N = a.N;
  p.K = a.K;
  p.group_size = a.group_size;
  p.bits = static_cast<int>(a.bits);
  p.zp_row_bytes = zero_point_row_bytes(a);
  p.scale = scales.GetTensorRawData();
  p.zero_points = static_cast<const uint8_t*>(zero_points.GetTensorRawData());
  p.correction = static_cast<const float*>(correction.GetTensorRawData());
  std::vector<float> zeros(static_cast<size_t>(a.N * (a.K / a.group_size)));
  nbits_zeros(p, zeros.data());
  return zeros;
}

// `x` rounded to float16 or bfloat16 (to nearest, ties to even; a NaN stays a NaN), as stored.
uint16_t half_bits(float x, DType dtype) {
  uint16_t bits;
  if (dtype == DType::F16) {
    const _Float16 half = static_cast<_Float16>(x);
    std::memcpy(&bits, &half, sizeof(bits));
    return bits;
  }
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u | 0x00400000u) >> 16);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// `bits` of a float16 or bfloat16 value, as a float (exact).
float half_value(uint16_t bits, DType dtype) {
  if (dtype == DType::F16) {
    _Float16 half;
    std::memcpy(&half, &bits, sizeof(half));
    return static_cast<float>(half);
  }
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// Problem::weight_tables of a 4-bit layer from its scales and zeros in `dtype`: hqq's w = rnd(rnd(q - z) * s) for
// q = 0..15, each float operation rounded to the dtype as cpu_kernel.cpp's dequant rounds it.
std::vector<uint8_t> weight_tables(const std::vector<uint16_t>& scales, const std::vector<uint16_t>& zeros,
                                   DType dtype) {
  std::vector<uint8_t> tables(zeros.size() * 32);
  for (size_t g = 0; g < zeros.size(); ++g) {
    const float zero = half_value(zeros[g], dtype), scale = half_value(scales[g], dtype);
    for (int q = 0; q < 16; ++q) {
      const float shifted = half_value(half_bits(static_cast<float>(q) - zero, dtype), dtype);
      const uint16_t weight = half_bits(shifted * scale, dtype);
      tables[g * 32 + q] = static_cast<uint8_t>(weight & 0xff);
      tables[g * 32 + 16 + q] = static_cast<uint8_t>(weight >> 8);
    }
  }
  return tables;
}

struct CpuKernel {
  static constexpr const char* kProvider = "CPUExecutionProvider";
  const OpSpec* spec;
  Attrs attrs;
  std::string node;
  std::vector<float> zeros;  // HQQMatMulNBits: constant_zeros, if computed
  // compute_dtype float16 / bfloat16 (at accuracy level 0): HQQ's scales and zeros in that dtype, so that the
  // layer dequantizes with hqq's two roundings per weight (the zeros come back exactly: the fp32 error of
  // zero_point - correction / scale is far below half a float16 or bfloat16 ulp)
  std::vector<uint16_t> meta_scales, meta_zeros;
  // 4-bit codes with such meta, groups a multiple of kWeightTableGroup, AVX2 (the only path that reads them):
  // the decode rows' weight tables (32 bytes per group)
  std::vector<uint8_t> meta_tables;

  bool checked() const { return !zeros.empty() || !meta_zeros.empty(); }

  // After constant_zeros: the scales and zeros in the compute dtype, where the node has one (then `zeros` goes).
  void set_meta(const float* scales) {
    if (zeros.empty() || attrs.compute_dtype == 1 || attrs.accuracy_level != 0) return;
    const DType dtype = static_cast<DType>(attrs.compute_dtype);
    meta_scales.resize(zeros.size());
    meta_zeros.resize(zeros.size());
    for (size_t g = 0; g < zeros.size(); ++g) {
      meta_scales[g] = half_bits(scales[g], dtype);
      meta_zeros[g] = half_bits(zeros[g], dtype);
    }
    zeros = std::vector<float>();
    if (attrs.bits == 4 && attrs.group_size % kWeightTableGroup == 0 && cpu_has_avx2()) {
      meta_tables = weight_tables(meta_scales, meta_zeros, dtype);
    }
  }

  std::string run(Ort::KernelContext& ctx, Problem& p) {
    if (!zeros.empty()) {
      p.zero = zeros.data();
      p.zero_points = nullptr;
      p.correction = nullptr;
    }
    if (!meta_zeros.empty()) {
      p.meta = static_cast<DType>(attrs.compute_dtype);
      p.scale = meta_scales.data();
      p.zero = meta_zeros.data();
      p.weight_tables = meta_tables.empty() ? nullptr : meta_tables.data();
      p.zero_points = nullptr;
      p.correction = nullptr;
    }
    const Runner runner{ctx.GetOrtKernelContext(), &ort_parallel_for};
    const bool avx2 = cpu_has_avx2();
    if (spec->half) return (avx2 ? avx2::half_matmul(p, runner) : baseline::half_matmul(p, runner)) ? "" : "out of memory";
    float* out = static_cast<float*>(p.Y);
    std::unique_ptr<float[]> product;  // SwiGLU: the full [M, N] product, gated into Y at the end
    if (spec->swiglu) {
      product.reset(new (std::nothrow) float[static_cast<size_t>(p.M * p.N)]);
      if (product == nullptr) return "out of memory";
      p.Y = product.get();
    }
    const bool ok = avx2 ? avx2::matmul(p, runner) && avx2::lora_add(p, runner)
                         : baseline::matmul(p, runner) && baseline::lora_add(p, runner);
    if (!ok) return "out of memory";
    if (spec->swiglu) (avx2 ? avx2::swiglu : baseline::swiglu)(product.get(), p.M, p.N / 2, out, runner);
    return "";
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) { return compute(*this, context); }
};

#ifdef HQEXPORT_WITH_CUDA
struct CudaKernel {
  static constexpr const char* kProvider = "CUDAExecutionProvider";
  const OpSpec* spec;
  Attrs attrs;
  std::string node;

  bool checked() const { return false; }

  std::string run(Ort::KernelContext& ctx, Problem& p) {
    const char* message = cuda_matmul(p, ctx.GetGPUComputeStream());
    return message == nullptr ? "" : message;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) { return compute(*this, context); }
};
#endif

// The node's integer attribute `name` into `value`; false (value untouched) when it is missing or not an integer.
bool read_int_attribute(const OrtKernelInfo* info, const char* name, int64_t& value) {
  int64_t read = 0;
  if (OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &read)) {
    Ort::GetApi().ReleaseStatus(status);
    return false;
  }
  value = read;
  return true;
}

template <typename Kernel>
struct Op : Ort::CustomOpBase<Op<Kernel>, Kernel, true> {
  Op(const OpSpec& spec, ONNXTensorElementDataType act) : spec_(&spec), act_(act) {}

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** out) const {
    std::string node = "?";
    try {
      Ort::ConstKernelInfo kinfo(info);
      node = kinfo.GetNodeName();
      Attrs a;
      for (const auto& [name, field] : spec_->attributes) {
        if (!read_int_attribute(info, name, a.*field)) {
          return error(spec_->op_type, node, std::string("missing or non-integer attribute '") + name + "'");
        }
      }
      for (const auto& [name, field] : spec_->optional) read_int_attribute(info, name, a.*field);  // absent: the default
      if (spec_->lora) a.lora_columns = kinfo.GetAttributes<int64_t>("lora_columns");
      const std::string message = spec_->check(a);
      if (!message.empty()) return error(spec_->op_type, node, message);
      auto kernel = std::make_unique<Kernel>(Kernel{spec_, a, node});
      if constexpr (std::is_same_v<Kernel, CpuKernel>) {
        if (spec_ != &kHqqSpec && !spec_->half) {
          kernel->zeros = constant_zeros(kinfo, a);
          int is_constant = 0;
          if (!kernel->zeros.empty()) kernel->set_meta(kinfo.GetTensorConstantInput(2, &is_constant).GetTensorData<float>());
        }
      }
      *out = kernel.release();
      return nullptr;
    } catch (const std::exception& e) {
      return error(spec_->op_type, node, e.what());
    }
  }

  const char* GetName() const { return spec_->op_type; }
  const char* GetExecutionProviderType() const { return Kernel::kProvider; }
  size_t GetInputTypeCount() const { return spec_->inputs; }
  // A (and HQQMatMul's bias) carry the overload's dtype; the others are checked in describe_*
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 || (spec_ == &kHqqSpec && i == 4) ? act_ : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= spec_->optional_from ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return act_; }

 private:
  const OpSpec* spec_;
  ONNXTensorElementDataType act_;
};

constexpr const char* kShortlistOp = "GridShortlist";

// GridShortlist (ops/shortlist.py): logits [..., V] and X [..., H] with the same leading dims, the grid's codes
// [V, H] and its scales and zero points [V, H / block_size]; their element types are the op's declared ones.
struct ShortlistKernel {
  int64_t k = 0, block_size = 0;
  std::string node;

  std::string describe(Ort::KernelContext& ctx, Shortlist& s, std::vector<int64_t>& y_shape) const {
    const std::vector<int64_t> logits = ctx.GetInput(0).GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> x = ctx.GetInput(1).GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> codes = ctx.GetInput(2).GetTensorTypeAndShapeInfo().GetShape();
    if (logits.empty() || x.size() != logits.size() || !std::equal(logits.begin(), logits.end() - 1, x.begin())) {
      return "logits " + shape_text(logits) + " and X " + shape_text(x) + " must share their leading dims";
    }
    s.vocab = logits.back();
    s.hidden = x.back();
    if (codes != std::vector<int64_t>{s.vocab, s.hidden}) {
      return "codes of shape " + shape_text(codes) + ", expected [V, H] = " + shape_text({s.vocab, s.hidden});
    }
    if (s.hidden % block_size != 0) return "block_size " + std::to_string(block_size) + " does not divide H = " + std::to_string(s.hidden);
    const std::vector<int64_t> blocks{s.vocab, s.hidden / block_size};
    for (const size_t i : {3, 4}) {
      const std::vector<int64_t> shape = ctx.GetInput(i).GetTensorTypeAndShapeInfo().GetShape();
      if (shape != blocks) return std::string(i == 3 ? "scales" : "zero_points") + " of shape " + shape_text(shape) + ", expected " + shape_text(blocks);
    }
    if (k > s.vocab) return "k = " + std::to_string(k) + " exceeds V = " + std::to_string(s.vocab);
    s.positions = 1;
    for (size_t i = 0; i + 1 < logits.size(); ++i) s.positions *= logits[i];
    s.k = k;
    s.block_size = block_size;
    y_shape = logits;
    return "";
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Ort::KernelContext ctx(context);
      Shortlist s;
      std::vector<int64_t> y_shape;
      const std::string message = describe(ctx, s, y_shape);
      if (!message.empty()) return error(kShortlistOp, node, message);
      s.logits = ctx.GetInput(0).GetTensorData<float>();
      s.X = ctx.GetInput(1).GetTensorData<float>();
      s.codes = ctx.GetInput(2).GetTensorData<uint8_t>();
      s.scales = ctx.GetInput(3).GetTensorData<float>();
      s.zero_points = ctx.GetInput(4).GetTensorData<uint8_t>();
      s.Y = ctx.GetOutput(0, y_shape).GetTensorMutableData<float>();
      if (s.positions == 0) return nullptr;
      const Runner runner{ctx.GetOrtKernelContext(), &ort_parallel_for};
      return grid_shortlist(s, runner) ? nullptr : error(kShortlistOp, node, "out of memory");
    } catch (const std::exception& e) {
      return error(kShortlistOp, node, e.what());
    }
  }
};

struct ShortlistOp : Ort::CustomOpBase<ShortlistOp, ShortlistKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** out) const {
    std::string node = "?";
    try {
      node = Ort::ConstKernelInfo(info).GetNodeName();
      auto kernel = std::make_unique<ShortlistKernel>();
      kernel->node = node;
      if (!read_int_attribute(info, "k", kernel->k) || !read_int_attribute(info, "block_size", kernel->block_size)) {
        return error(kShortlistOp, node, "missing or non-integer attribute 'k' or 'block_size'");
      }
      if (kernel->k < 1) return error(kShortlistOp, node, "k must be positive, got " + std::to_string(kernel->k));
      if (kernel->block_size < 16 || (kernel->block_size & (kernel->block_size - 1)) != 0) {
        return error(kShortlistOp, node, "block_size must be a power of 2 >= 16, got " + std::to_string(kernel->block_size));
      }
      *out = kernel.release();
      return nullptr;
    } catch (const std::exception& e) {
      return error(kShortlistOp, node, e.what());
    }
  }

  const char* GetName() const { return kShortlistOp; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 2 || i == 4 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

template <typename Kernel>
void add_hqq_ops(Ort::CustomOpDomain& domain) {
  static Op<Kernel> f32(kHqqSpec, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  static Op<Kernel> f16(kHqqSpec, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  domain.Add(&f32);
  domain.Add(&f16);
}

// The ops with fp32 activations only, on the CPU: the HQQMatMulNBits family, HalfMatMul and GridShortlist.
void add_fp32_ops(Ort::CustomOpDomain& domain) {
  static Op<CpuKernel> nbits(kNbitsSpec, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  static Op<CpuKernel> nbits_lora(kNbitsLoraSpec, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  static Op<CpuKernel> nbits_swiglu(kNbitsSwigluSpec, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  static Op<CpuKernel> nbits_lora_swiglu(kNbitsLoraSwigluSpec, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  static Op<CpuKernel> half(kHalfSpec, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  for (auto* op : {&nbits, &nbits_lora, &nbits_swiglu, &nbits_lora_swiglu, &half}) domain.Add(op);
  static ShortlistOp shortlist;
  domain.Add(&shortlist);
}

// Domains must outlive every session that uses them: kept until the library is unloaded.
std::mutex domains_mutex;
std::vector<Ort::CustomOpDomain> domains;

}  // namespace
}  // namespace hqx

HQX_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    std::fprintf(stderr, "hqexport kernels: this onnxruntime does not provide ORT API version %d\n", ORT_API_VERSION);
    return nullptr;
  }
  Ort::InitApi(api);
  try {
    Ort::CustomOpDomain domain{hqx::kDomain};
    hqx::add_hqq_ops<hqx::CpuKernel>(domain);
    hqx::add_fp32_ops(domain);
#ifdef HQEXPORT_WITH_CUDA
    hqx::add_hqq_ops<hqx::CudaKernel>(domain);
#endif
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(hqx::domains_mutex);
    hqx::domains.push_back(std::move(domain));
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  }
}

// The dequantized weight [N, K] as floats (values of A's dtype), for tests that check it bit for bit against the
// numpy reference. meta/act are ONNX element types; returns 0, or 1 for arguments the op would refuse.
HQX_EXPORT int hqexport_dequantize(const void* W, const void* scale, const void* zero, int meta, int act, int64_t N,
                                   int64_t K, int64_t bits, int64_t group_size, int64_t axis, float* out) {
  const hqx::Attrs a{N, K, bits, group_size, axis};
  const bool types_ok = (act == 1 || act == 10) && (meta == 1 || meta == 10 || meta == 16);
  if (!hqx::check_attrs(a).empty() || !types_ok) return 1;
  hqx::Problem p;
  p.N = N;
  p.K = K;
  p.group_size = group_size;
  p.groups = N * K / group_size;
  p.row_words = (K + hqx::codes_per_word(bits) - 1) / hqx::codes_per_word(bits);
  p.bits = static_cast<int>(bits);
  p.axis = static_cast<int>(axis);
  p.act = static_cast<hqx::DType>(act);
  p.meta = static_cast<hqx::DType>(meta);
  p.W = W;
  p.scale = scale;
  p.zero = zero;
  if (hqx::cpu_has_avx2()) {
    hqx::avx2::dequantize(p, out);
  } else {
    hqx::baseline::dequantize(p, out);
  }
  return 0;
}

// W's words as this library reads them (problem.h), for tests/test_layout_record.py to check against
// formats/canonical.py's LAYOUTS: bytes per word (0 for a width the layout does not have) and codes per word.
HQX_EXPORT int64_t hqexport_word_bytes(int64_t bits) { return hqx::word_bytes(bits); }
HQX_EXPORT int64_t hqexport_codes_per_word(int64_t bits) { return hqx::codes_per_word(bits); }

// "avx2" or "baseline": which build of the CPU kernel this machine runs.
HQX_EXPORT const char* hqexport_cpu_isa() { return hqx::cpu_has_avx2() ? "avx2" : "baseline"; }
