# Conan's test of the shardlm package: finds it, compiles a one-recipe trainer against it (shardlm::compiled when
# the package holds it) and trains the tiny Llama a few steps on the CPU.
import os

from conan import ConanFile
from conan.tools.build import can_run
from conan.tools.cmake import CMake, cmake_layout


class ShardlmTestConan(ConanFile):
    settings = "os", "arch", "compiler", "build_type"
    generators = "CMakeDeps", "CMakeToolchain"

    def requirements(self):
        self.requires(self.tested_reference_str)

    def layout(self):
        cmake_layout(self)

    def build(self):
        cmake = CMake(self)
        cmake.configure()
        cmake.build()

    def test(self):
        if can_run(self):
            trainer = os.path.join(self.cpp.build.bindir, "test_package")
            self.run(f"{trainer} --steps 3 --layers 1 --seq-len 16 --micro-batch 2 --log-every 1", env="conanrun")
