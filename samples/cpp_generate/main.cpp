// Greedy generation from an hqexport output folder with the onnxruntime C++ API.
//
//   hqexport_generate FOLDER --ids 314,69,260 [--tokens N] [--adapter FILE.onnx_adapter] [--kernels LIB.so]
//
// Prints the generated token ids, space separated, on one line. Tokenization is left to tokenize.py.
// The graph's I/O is hqexport's contract: input_ids, attention_mask, position_ids (if present) and
// past_key_values.{i}.key/.value [1, kv_heads, past, head_dim] in; logits and present.{i}.key/.value out.
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Args {
  std::string folder;
  std::vector<int64_t> ids;
  int tokens = 16;
  std::string adapter;  // empty: the base model
  std::string kernels;  // empty: hqexport ops (if any) run as their ONNX function body
};

std::vector<int64_t> ParseIds(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) ids.push_back(std::stoll(item));
  if (ids.empty()) throw std::invalid_argument("--ids needs at least one token id");
  return ids;
}

Args ParseArgs(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--ids") args.ids = ParseIds(value());
    else if (arg == "--tokens") args.tokens = std::stoi(value());
    else if (arg == "--adapter") args.adapter = value();
    else if (arg == "--kernels") args.kernels = value();
    else if (!arg.empty() && arg[0] == '-') throw std::invalid_argument("unknown option " + arg);
    else args.folder = arg;
  }
  if (args.folder.empty() || args.ids.empty())
    throw std::invalid_argument(
        "usage: hqexport_generate FOLDER --ids 1,2,3 [--tokens N] [--adapter FILE] [--kernels LIB]");
  return args;
}

// Index of the largest of the last position's logits (float or float16).
int64_t ArgmaxLastPosition(const Ort::Value& logits) {
  auto info = logits.GetTensorTypeAndShapeInfo();
  std::vector<int64_t> shape = info.GetShape();  // [1, seq, vocab]
  const int64_t vocab = shape[2];
  const size_t offset = static_cast<size_t>((shape[1] - 1) * vocab);
  std::vector<float> last(static_cast<size_t>(vocab));
  if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
    const Ort::Float16_t* data = logits.GetTensorData<Ort::Float16_t>() + offset;
    for (int64_t v = 0; v < vocab; ++v) last[v] = data[v].ToFloat();
  } else {
    const float* data = logits.GetTensorData<float>() + offset;
    std::copy(data, data + vocab, last.begin());
  }
  return std::max_element(last.begin(), last.end()) - last.begin();  // first maximum, like numpy.argmax
}

Ort::Value Int64Tensor(const std::vector<int64_t>& values, const std::vector<int64_t>& shape) {
  Ort::AllocatorWithDefaultOptions allocator;
  Ort::Value tensor = Ort::Value::CreateTensor<int64_t>(allocator, shape.data(), shape.size());
  std::copy(values.begin(), values.end(), tensor.GetTensorMutableData<int64_t>());
  return tensor;
}

int Run(const Args& args) {
  Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "hqexport_generate");
  Ort::SessionOptions options;
  if (!args.kernels.empty()) options.RegisterCustomOpsLibrary(args.kernels.c_str());
  const std::string model_path = args.folder + "/model.onnx";
  Ort::Session session(env, model_path.c_str(), options);

  // Keep the adapter alive for as long as the RunOptions that reference it are used.
  Ort::LoraAdapter adapter{nullptr};
  Ort::RunOptions run_options;
  if (!args.adapter.empty()) {
    if (!std::ifstream(args.adapter)) throw std::invalid_argument(args.adapter + ": adapter file not found");
    adapter = Ort::LoraAdapter::CreateLoraAdapter(args.adapter, nullptr);
    run_options.AddActiveLoraAdapter(adapter);
  }

  // Names of the inputs and outputs, and the cache's dtype and dims, from the session.
  Ort::AllocatorWithDefaultOptions allocator;
  std::vector<std::string> input_names, output_names;
  for (size_t i = 0; i < session.GetInputCount(); ++i)
    input_names.push_back(session.GetInputNameAllocated(i, allocator).get());
  for (size_t i = 0; i < session.GetOutputCount(); ++i)
    output_names.push_back(session.GetOutputNameAllocated(i, allocator).get());
  auto has_input = [&](const std::string& name) {
    return std::find(input_names.begin(), input_names.end(), name) != input_names.end();
  };
  if (!has_input("past_key_values.0.key")) throw std::runtime_error(model_path + " has no past_key_values inputs");
  size_t layers = 0;
  while (has_input("past_key_values." + std::to_string(layers) + ".key")) ++layers;
  const size_t key_index = std::find(input_names.begin(), input_names.end(), "past_key_values.0.key") - input_names.begin();
  Ort::TypeInfo cache_type = session.GetInputTypeInfo(key_index);  // owns what cache_info points into
  auto cache_info = cache_type.GetTensorTypeAndShapeInfo();
  const ONNXTensorElementDataType cache_dtype = cache_info.GetElementType();
  std::vector<int64_t> cache_shape = cache_info.GetShape();  // [batch, kv_heads, past, head_dim]
  if (cache_shape.size() != 4 || cache_shape[1] <= 0 || cache_shape[3] <= 0)
    throw std::runtime_error("past_key_values.0.key must have static kv_heads and head_dim");
  cache_shape[0] = 1;
  cache_shape[2] = 0;
  const bool uses_position_ids = has_input("position_ids");

  // Inputs by name: the cache starts empty and is replaced by the present outputs after every run.
  std::vector<std::string> names;
  std::vector<Ort::Value> values;
  auto set = [&](const std::string& name, Ort::Value value) {
    auto found = std::find(names.begin(), names.end(), name);
    if (found == names.end()) {
      names.push_back(name);
      values.push_back(std::move(value));
    } else {
      values[found - names.begin()] = std::move(value);
    }
  };
  for (size_t layer = 0; layer < layers; ++layer)
    for (const char* kind : {"key", "value"})
      set("past_key_values." + std::to_string(layer) + "." + kind,
          Ort::Value::CreateTensor(allocator, cache_shape.data(), cache_shape.size(), cache_dtype));

  std::vector<const char*> output_ptrs;
  for (const auto& name : output_names) output_ptrs.push_back(name.c_str());
  std::vector<int64_t> step_ids = args.ids;
  int64_t past = 0;
  std::vector<int64_t> generated;
  for (int t = 0; t < args.tokens; ++t) {
    const int64_t length = static_cast<int64_t>(step_ids.size());
    set("input_ids", Int64Tensor(step_ids, {1, length}));
    set("attention_mask", Int64Tensor(std::vector<int64_t>(past + length, 1), {1, past + length}));
    if (uses_position_ids) {
      std::vector<int64_t> positions(length);
      std::iota(positions.begin(), positions.end(), past);
      set("position_ids", Int64Tensor(positions, {1, length}));
    }
    std::vector<const char*> input_ptrs;
    for (const auto& name : names) input_ptrs.push_back(name.c_str());
    std::vector<Ort::Value> outputs = session.Run(run_options, input_ptrs.data(), values.data(), values.size(),
                                                  output_ptrs.data(), output_ptrs.size());
    int64_t token = -1;
    for (size_t o = 0; o < outputs.size(); ++o) {
      const std::string& name = output_names[o];
      if (name == "logits") {
        token = ArgmaxLastPosition(outputs[o]);
      } else if (name.rfind("present.", 0) == 0) {
        set("past_key_values." + name.substr(8), std::move(outputs[o]));
      }
    }
    if (token < 0) throw std::runtime_error(model_path + " has no logits output");
    generated.push_back(token);
    past += length;
    step_ids = {token};
  }
  for (size_t i = 0; i < generated.size(); ++i) std::cout << (i ? " " : "") << generated[i];
  std::cout << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(ParseArgs(argc, argv));
  } catch (const Ort::Exception& error) {
    std::cerr << "hqexport_generate: onnxruntime: " << error.what() << std::endl;
  } catch (const std::exception& error) {
    std::cerr << "hqexport_generate: " << error.what() << std::endl;
  }
  return 2;
}
