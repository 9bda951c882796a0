#!/usr/bin/env python3
"""Registers and stack frame (spills) per kernel of the CUBINs build.rs embeds, read from each
CUBIN's ELF `.nv.info` section (no CUDA toolkit needed).
Usage: scripts/kernel_resources.py [target/release/build/srsde-fast-*/out/*.cubin ...]"""
import glob
import struct
import sys

ATTRS = {0x2F: "regs", 0x11: "frame"}  # EIATTR_REGCOUNT, EIATTR_FRAME_SIZE


def resources(path):
    d = open(path, "rb").read()
    shoff = struct.unpack_from("<Q", d, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", d, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", d, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = secs[shstrndx][4]

    def cstr(base, n):
        return d[base + n : d.index(b"\0", base + n)].decode()

    symtab = next(s for s in secs if s[1] == 2)
    sym_str = secs[symtab[6]][4]
    out = {}
    for s in secs:
        if cstr(strtab_off, s[0]) != ".nv.info":
            continue
        p, end = s[4], s[4] + s[5]
        while p < end:
            fmt, attr = d[p], d[p + 1]
            if fmt == 4:  # EIFMT_SVAL: u16 size + payload
                size = struct.unpack_from("<H", d, p + 2)[0]
                if attr in ATTRS and size == 8:
                    sym, val = struct.unpack_from("<II", d, p + 4)
                    name = cstr(sym_str, struct.unpack_from("<I", d, symtab[4] + sym * 24)[0])
                    if not name.startswith("$"):
                        out.setdefault(name, {})[ATTRS[attr]] = val
                p += 4 + size
            elif fmt in (2, 3):  # EIFMT_HVAL / EIFMT_BVAL
                p += 4
            else:
                p += 2
    return out


paths = sys.argv[1:] or sorted(glob.glob("target/release/build/srsde-fast-*/out/*.cubin"))
for path in paths:
    for name, r in sorted(resources(path).items()):
        print(f"{path.split('/')[-1]:<18} {name:<32} regs {r.get('regs', '?'):>4}  frame {r.get('frame', '?'):>4} B")
