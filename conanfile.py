# The Conan 2 recipe of shardlm (docs/packaging.md): `conan create .` packages the headers (a header-library, one
# package for every configuration); with -o "shardlm/*:compiled=True" the package also holds shardlm::compiled (a
# static library, compiled against the profile's LibTorch). Consumers use the project's own CMake package
# (find_package(shardlm) through the package's lib/cmake/shardlm), which finds the dependencies below.
#
# LibTorch: ConanCenter's libtorch recipe is CPU-only and built without distributed support (no c10d headers, which
# shardlm's CPU process groups include), so it cannot serve; users bring their own LibTorch (the PyTorch wheel's,
# CUDA or not) and declare it in their profile's [platform_requires] (libtorch/2.11.0), with its CMake directory
# (torch.utils.cmake_prefix_path) passed to CMake. Gloo's headers have no ConanCenter recipe: the config finds them
# on the machine (Debian: libgloo-dev). Tested offline by tests/packaging/conan.cmake with every
# dependency a platform requirement.
import os

from conan import ConanFile
from conan.errors import ConanInvalidConfiguration
from conan.tools.build import check_min_cppstd
from conan.tools.cmake import CMake, CMakeToolchain, cmake_layout
from conan.tools.files import load

required_conan_version = ">=2.1"


class ShardlmConan(ConanFile):
    name = "shardlm"
    description = ("Sharded (ZeRO-style) training and fine-tuning of Llama 3 and Mixtral on LibTorch: compile-time "
                   "policies for sharding, recompute, offload, precision, LoRA/DoRA on quantized bases")
    topics = ("llm", "training", "libtorch", "fsdp", "zero", "lora", "header-only")
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"
    options = {
        # Also package shardlm::compiled (the trainer, the run and the command line compiled once): a user's main
        # then compiles in seconds instead of a minute. Makes the package a static library of this configuration.
        "compiled": [True, False],
        # NCCL for multi-GPU jobs (from the CUDA LibTorch: the wheel's nvidia-nccl, or /usr/local/cuda): "auto" uses
        # it when found; True requires it (the consumer's configure fails if it is missing); False never uses it.
        "with_nccl": ["auto", True, False],
    }
    default_options = {"compiled": False, "with_nccl": "auto"}
    exports_sources = "CMakeLists.txt", "cmake/*", "include/*", "src/*"
    no_copy_source = True

    def set_version(self):
        # One place holds the version: project(shardlm VERSION ...) in CMakeLists.txt.
        text = load(self, os.path.join(self.recipe_folder, "CMakeLists.txt"))
        start = text.index("project(shardlm VERSION ") + len("project(shardlm VERSION ")
        self.version = text[start:].split()[0]

    def configure(self):
        if self.options.compiled:
            self.package_type = "static-library"

    def layout(self):
        cmake_layout(self)

    def requirements(self):
        # Version ranges that ConanCenter's versions and Debian bookworm's (platform requirements) both satisfy.
        self.requires("libtorch/[>=2.11 <3]")
        self.requires("nlohmann_json/[>=3.10 <4]")
        self.requires("cxxopts/[>=3.1 <4]")
        self.requires("range-v3/[>=0.12 <1]")
        self.requires("pcre2/[>=10.42 <11]")

    def package_id(self):
        # The headers are the same for every configuration; the NCCL choice is written into the package's config.
        if not self.info.options.compiled:
            self.info.settings.clear()
            self.info.requires.clear()

    def validate(self):
        check_min_cppstd(self, 20)
        if self.settings.os != "Linux":
            raise ConanInvalidConfiguration("shardlm is built and tested on Linux only (POSIX I/O, c10d, NCCL)")

    def generate(self):
        tc = CMakeToolchain(self)
        tc.cache_variables["SHARDLM_BUILD_TESTS"] = False
        tc.cache_variables["SHARDLM_BUILD_TOOLS"] = False
        tc.cache_variables["SHARDLM_BUILD_BENCHMARKS"] = False
        tc.cache_variables["SHARDLM_INSTALL"] = True
        tc.cache_variables["SHARDLM_BUILD_COMPILED"] = bool(self.options.compiled)
        tc.cache_variables["SHARDLM_NCCL"] = {"auto": "AUTO", "True": "ON", "False": "OFF"}[str(self.options.with_nccl)]
        tc.generate()

    def build(self):
        cmake = CMake(self)
        cmake.configure()
        cmake.build()

    def package(self):
        CMake(self).install()

    def package_info(self):
        # Consumers get the project's own config (lib/cmake/shardlm/shardlmConfig.cmake, found through builddirs):
        # it finds LibTorch, Gloo's headers and NCCL on the consumer's machine, which no generated config could.
        self.cpp_info.set_property("cmake_find_mode", "none")
        self.cpp_info.builddirs = [os.path.join("lib", "cmake", "shardlm")]
        self.cpp_info.bindirs = []
        if self.options.compiled:
            self.cpp_info.libs = ["shardlm_compiled"]
            self.cpp_info.defines = ["SHARDLM_COMPILED=1"]
        else:
            self.cpp_info.libdirs = []
