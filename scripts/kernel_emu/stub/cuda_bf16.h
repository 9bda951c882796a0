// Empty stand-in: emu.h provides the WMMA and bf16 subset the kernels use.
