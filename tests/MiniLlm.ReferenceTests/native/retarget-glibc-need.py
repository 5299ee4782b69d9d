"""Rewrite one version need (e.g. GLIBC_2.38 → GLIBC_2.36) in an ELF64 .gnu.version_r, in place.
The two names must have the same length; the ELF hash of the need is updated to match."""
import struct, sys

path, old, new = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode()
assert len(old) == len(new), "names must have equal length"
b = bytearray(open(path, 'rb').read())
shoff = struct.unpack_from('<Q', b, 0x28)[0]
shentsize, shnum, shstrndx = struct.unpack_from('<HHH', b, 0x3A)
secs = [struct.unpack_from('<IIQQQQIIQQ', b, shoff + i * shentsize) for i in range(shnum)]
strtab = secs[shstrndx][4]
name = lambda o: bytes(b[o:b.index(0, o)])
by_name = {name(strtab + s[0]): s for s in secs}
verneed, dynstr = by_name[b'.gnu.version_r'], by_name[b'.dynstr']

def elf_hash(s):
    h = 0
    for c in s:
        h = (h << 4) + c
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h

off, count, done = verneed[4], verneed[7], 0
for _ in range(count):
    _, cnt, _, aux, nxt = struct.unpack_from('<HHIII', b, off)
    a = off + aux
    for _ in range(cnt):
        _, _, _, nameoff, anext = struct.unpack_from('<IHHII', b, a)
        s = dynstr[4] + nameoff
        if name(s) == old:
            b[s:s + len(new)] = new
            struct.pack_into('<I', b, a, elf_hash(new))
            done += 1
        if anext == 0:
            break
        a += anext
    if nxt == 0:
        break
    off += nxt
if done == 0:
    sys.exit(f"{path}: no version need {old.decode()}")
open(path, 'wb').write(b)
print(f"{path}: {done} need(s) {old.decode()} -> {new.decode()}")
