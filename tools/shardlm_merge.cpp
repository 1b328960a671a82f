// shardlm_merge --base DIR --adapter DIR --out DIR
// Merges a PEFT LoRA/DoRA adapter into its Hugging Face base model and writes the merged checkpoint: streaming,
// one weight file of the base at a time, with the base's file names, dtypes, index and config.json
// (io/peft.hpp: merge_peft_adapter).
#include <shardlm/shardlm.hpp>

int main(int argc, char** argv) {
  return shardlm::guarded_main("shardlm_merge", [&] {
    cxxopts::Options opts("shardlm_merge", "Merge a PEFT adapter into its base model");
    opts.add_options()("base", "Hugging Face base model directory", cxxopts::value<std::string>())(
        "adapter", "PEFT adapter directory (adapter_config.json, adapter_model.safetensors)", cxxopts::value<std::string>())(
        "out", "directory to write the merged model to", cxxopts::value<std::string>())("h,help", "this help");
    const auto args = opts.parse(argc, argv);
    if (args.count("help")) {
      std::cout << opts.help() << '\n';
      return 0;
    }
    for (const char* required : {"base", "adapter", "out"})
      if (!args.count(required)) shardlm::fail<shardlm::ConfigError>("--", required, " is required (see --help)");
    const auto n = shardlm::io::merge_peft_adapter(args["base"].as<std::string>(), args["adapter"].as<std::string>(),
                                                   args["out"].as<std::string>());
    shardlm::log::info("shardlm_merge: merged ", n, " adapted weights into ", args["out"].as<std::string>());
    return 0;
  });
}
