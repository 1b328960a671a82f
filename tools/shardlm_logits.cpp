// shardlm_logits --model DIR --input IN.safetensors --output OUT.safetensors [--adapter DIR] [--device cpu|cuda]
//                [--dtype fp32|bf16]
// Runs the forward of a Hugging Face checkpoint (Llama or Mixtral, by config.json's model_type; with a PEFT LoRA/DoRA
// adapter on it) on `input_ids` (int64 [B, T]) and writes `logits` (fp32 [B, T, V]) and `loss`
// (mean next-token cross-entropy with labels = input_ids, as transformers reports it). For Mixtral also `aux_loss`
// (the load-balancing loss), and `loss` adds router_aux_loss_coef x aux_loss when the config's
// output_router_logits is true, as transformers does.
#include <shardlm/shardlm.hpp>

int main(int argc, char** argv) {
  return shardlm::guarded_main("shardlm_logits", [&] {
    cxxopts::Options opts("shardlm_logits", "Forward of a Hugging Face checkpoint: logits and loss");
    opts.add_options()("model", "Hugging Face model directory", cxxopts::value<std::string>())(
        "input", "safetensors file holding input_ids (int64 [B, T])", cxxopts::value<std::string>())(
        "output", "safetensors file to write logits and loss to", cxxopts::value<std::string>())(
        "adapter", "PEFT adapter directory (LoRA or DoRA) applied to the model", cxxopts::value<std::string>())(
        "device", "cpu or cuda", cxxopts::value<std::string>()->default_value("cpu"))(
        "dtype", "compute dtype: fp32 or bf16", cxxopts::value<std::string>()->default_value("fp32"))(
        "moe-kernel", "how a MoE model's experts compute: auto, loop, padded or grouped",
        cxxopts::value<std::string>()->default_value("auto"))("h,help", "this help");
    const auto args = opts.parse(argc, argv);
    if (args.count("help")) {
      std::cout << opts.help() << '\n';
      return 0;
    }
    for (const char* required : {"model", "input", "output"})
      if (!args.count(required)) shardlm::fail<shardlm::ConfigError>("--", required, " is required (see --help)");
    const auto device = shardlm::parse_device(args["device"].as<std::string>());
    const auto dtype = shardlm::parse_dtype(args["dtype"].as<std::string>(), "--dtype");
    const auto experts = shardlm::model::expert_kernel_named(args["moe-kernel"].as<std::string>());

    const auto input_path = args["input"].as<std::string>();
    shardlm::io::SafetensorsFile input(input_path);
    const auto& info = input.info("input_ids");
    if (shardlm::io::scalar_type_of(info) != at::kLong || info.shape.size() != 2)
      shardlm::fail<shardlm::IoError>(input_path, ": input_ids must be int64 [B, T], got ", info.dtype, " of rank ",
                                      info.shape.size());
    if (info.numel() == 0)
      shardlm::fail<shardlm::IoError>(input_path, ": input_ids is empty ([", info.shape[0], ", ", info.shape[1],
                                      "]): expected at least one sequence of at least one token");
    const auto ids = input.read("input_ids");

    const auto run = [&]<class Model>(Model) {
      auto model = shardlm::io::load_hf_model<Model>(args["model"].as<std::string>(), device, dtype, experts);
      const auto& config = model->config();
      if (args.count("adapter")) {
        const auto dir = args["adapter"].as<std::string>();
        const auto adapter = shardlm::io::read_peft_adapter(dir);
        try {
          model->add_adapters(adapter.config);
        } catch (const shardlm::ConfigError& e) {  // the adapter's targets do not fit this model
          shardlm::fail<shardlm::ConfigError>("--adapter ", dir, ": ", e.what());
        }
        shardlm::io::load_adapter_weights(*model, adapter, dir);
      }
      model->eval();
      if (ids.numel() > 0 && (ids.min().item<int64_t>() < 0 || ids.max().item<int64_t>() >= config.vocab_size))
        shardlm::fail<shardlm::IoError>(input_path, ": input_ids must lie in [0, ", config.vocab_size, ")");
      at::NoGradGuard no_grad;
      std::vector<at::Tensor> router_stats;
      const auto logits = model->forward(ids.to(device), &router_stats);
      auto loss = shardlm::model::ops::next_token_loss(logits, ids.to(device)).to(at::kFloat);
      std::vector<std::pair<std::string, at::Tensor>> out{{"logits", logits.to(at::kFloat)}};
      if (const auto router = shardlm::model::router_loss(router_stats, config); router.aux.defined()) {
        if (config.output_router_logits) loss = loss + config.router_aux_loss_coef * router.aux;
        out.emplace_back("aux_loss", router.aux);
      }
      out.emplace_back("loss", loss);
      shardlm::io::save_safetensors(args["output"].as<std::string>(), out);
    };
    if (shardlm::model::load_config(args["model"].as<std::string>()).is_moe()) run(shardlm::model::Mixtral{nullptr});
    else run(shardlm::model::Llama3{nullptr});
    return 0;
  });
}
