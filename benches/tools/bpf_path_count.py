#!/usr/bin/env python3
"""Counts the BPF instructions, helper calls and BPF-to-BPF calls lb_xdp executes on one
frame: a small eBPF interpreter over `llvm-objdump -dr -l` text, the maps of a loaded
dataplane (dumped by bpftool) and the frame. Timings on a shared VM vary by 10-30%; this
count does not, so it tells which change moved a path, and by how much, before a benchmark
says whether it matters. Not a verifier and not the JIT: helpers are modelled only as far
as lb_xdp's paths need (map lookups and updates, the clock, the frame's length, the FIB as a
hit, ring buffers as sinks), and a BPF instruction is not an x86 one.

    lb-bench hold 120 &                 # a loaded dataplane with one connection, frames in /tmp
    O=target/release/build/lb-daemon-*/out/lb-ebpf.o
    llvm-objdump-22 -dr -l $O > /tmp/obj.txt
    bpf_path_count.py dump $O /tmp/maps.json
    bpf_path_count.py count /tmp/obj.txt /tmp/maps.json /tmp/lb-hold/ack.bin --ifindex $(cat /tmp/lb-hold/ifindex)
    bpf_path_count.py count ... /tmp/lb-hold/syn.bin --warm /tmp/lb-hold/syn.bin --forget

docs/BENCHMARKS.md, "Counting a path", says more."""
import json, re, struct, sys, collections

M64 = (1 << 64) - 1

def s64(x):
    x &= M64
    return x - (1 << 64) if x >> 63 else x

def s32(x):
    x &= 0xffffffff
    return x - (1 << 32) if x >> 31 else x

# ---------------------------------------------------------------- program text
def load_obj(path):
    """sections: name -> list of (insn index, bytes, reloc symbol or None); funcs: (sec, idx) -> name"""
    secs = collections.defaultdict(dict)
    funcs = {}
    sec = None
    last = None
    srcline = None
    for line in open(path):
        m = re.match(r'^; (/\S+:\d+)', line)
        if m:
            srcline = m.group(1); continue
        m = re.match(r'^Disassembly of section (\S+):', line)
        if m:
            sec = m.group(1); continue
        m = re.match(r'^([0-9a-f]+) <(.+)>:', line)
        if m:
            funcs[(sec, int(m.group(1), 16) // 8)] = m.group(2); continue
        m = re.match(r'^\s+(\d+):\t((?:[0-9a-f]{2} ?)+)\t', line)
        if m:
            idx = int(m.group(1)); b = bytes.fromhex(m.group(2).replace(' ', ''))
            secs[sec][idx] = [b, None, srcline]
            last = (sec, idx); continue
        m = re.match(r'^\s+[0-9a-f]+:\s+(R_BPF_\S+)\s+(\S+)', line)
        if m and last:
            secs[last[0]][last[1]][1] = m.group(2)
    return secs, funcs

# ---------------------------------------------------------------- memory
class Mem:
    def __init__(self):
        self.regions = {}
        self.next = 1
    def alloc(self, data, name):
        base = self.next << 32
        self.next += 1
        self.regions[base >> 32] = [bytearray(data), name]
        return base
    def _r(self, addr, n):
        r = self.regions.get(addr >> 32)
        off = addr & 0xffffffff
        if r is None or off + n > len(r[0]):
            raise Exception(f'bad access {addr:#x}+{n} ({r[1] if r else None}, len {len(r[0]) if r else 0})')
        return r[0], off
    def load(self, addr, n):
        b, o = self._r(addr, n)
        return int.from_bytes(b[o:o + n], 'little')
    def store(self, addr, n, v):
        b, o = self._r(addr, n)
        b[o:o + n] = (v & ((1 << (8 * n)) - 1)).to_bytes(n, 'little')
    def read(self, addr, n):
        b, o = self._r(addr, n)
        return bytes(b[o:o + n])

# ---------------------------------------------------------------- maps
class Map:
    def __init__(self, mem, info, dump):
        self.mem = mem
        self.name = info['name']
        self.type = info['type']
        self.ks = info['bytes_key']
        self.vs = info['bytes_value']
        self.max = info.get('max_entries', 0)
        self.entries = {}
        for e in dump or []:
            k = bytes(int(x, 16) for x in e['key']) if 'key' in e else None
            if 'values' in e:
                v = bytes(int(x, 16) for x in e['values'][0]['value'])
            elif 'value' in e:
                v = bytes(int(x, 16) for x in e['value'])
            else:
                continue
            self.entries[k] = self.mem.alloc(v + bytes(256), self.name)
    def lookup(self, key):
        if self.type in ('array', 'percpu_array'):
            i = int.from_bytes(key, 'little')
            if i >= self.max:
                return 0
            if key not in self.entries:
                self.entries[key] = self.mem.alloc(bytes(self.vs + 256), self.name)
            return self.entries[key]
        return self.entries.get(key, 0)
    def update(self, key, val):
        if key in self.entries:
            a = self.entries[key]
            b, o = self.mem._r(a, self.vs); b[o:o + self.vs] = val
        else:
            self.entries[key] = self.mem.alloc(val, self.name)
        return 0

def bt(*a):
    import subprocess
    return json.loads(subprocess.check_output(['bpftool', '-j', *a]))


def dump_main(obj, out):
    import subprocess, time
    progs = [p for p in bt('prog', 'show') if p.get('name') == 'lb_xdp']
    if not progs:
        sys.exit('no lb_xdp loaded: run `lb-bench hold` first')
    prog = max(progs, key=lambda p: p['id'])
    syms = set()
    for line in subprocess.check_output(['llvm-objdump-22', '-r', obj], text=True).splitlines():
        m = re.search(r'R_BPF_64_64\s+(\S+)', line)
        if m: syms.add(m.group(1))
    res = {'maps': {}, 'sections': {}}
    infos = [bt('map', 'show', 'id', str(i)) for i in prog['map_ids']]
    for sym in syms:
        if sym.startswith('.'):
            continue
        cand = [i for i in infos if i['name'] == sym[:15]]
        if not cand:
            print('no map for', sym, file=sys.stderr); continue
        info = cand[0]
        dump = None
        if info['type'] not in ('ringbuf', 'perf_event_array') and not (info['type'] in ('array', 'percpu_array') and info['max_entries'] > 70000):
            try:
                dump = bt('map', 'dump', 'id', str(info['id']))
            except subprocess.CalledProcessError:
                dump = None
            # arrays: keep only non-zero values
            if dump and info['type'] in ('array', 'percpu_array'):
                def nz(e):
                    v = e.get('value') or (e.get('values') or [{}])[0].get('value') or []
                    return any(int(x, 16) for x in v)
                dump = [e for e in dump if nz(e)]
        res['maps'][sym] = (info, dump)
        print(sym, info['type'], info['max_entries'], len(dump) if dump else dump, file=sys.stderr)
    # .rodata bytes
    txt = subprocess.check_output(['llvm-objdump-22', '-s', '-j', '.rodata', obj], text=True)
    hexs = ''
    for line in txt.splitlines():
        m = re.match(r'^ [0-9a-f]+ ((?:[0-9a-f]{1,8} ){1,4})', line)
        if m: hexs += m.group(1).replace(' ', '')
    res['sections']['.rodata'] = hexs
    res['now'] = time.clock_gettime_ns(time.CLOCK_MONOTONIC) 
    json.dump(res, open(out, 'w'))


# ---------------------------------------------------------------- run
LINES = []
HELPERS = {1: 'map_lookup_elem', 2: 'map_update_elem', 3: 'map_delete_elem', 5: 'ktime_get_ns',
           23: 'redirect', 44: 'xdp_adjust_head', 65: 'xdp_adjust_tail', 69: 'fib_lookup',
           130: 'ringbuf_output', 131: 'ringbuf_reserve', 132: 'ringbuf_submit',
           118: 'jiffies64', 133: 'ringbuf_discard', 160: 'ktime_get_coarse_ns', 181: 'loop',
           188: 'xdp_get_buff_len'}
XDP_NAMES = {0: 'ABORTED', 1: 'DROP', 2: 'PASS', 3: 'TX', 4: 'REDIRECT'}

def run(mem, secs, funcs, maps, rodata, frame, ifindex, now, entry=('xdp.frags', 'lb_xdp'), trace=False):
    # the packet with headroom, and the context
    HEAD = 256
    pkt = mem.alloc(bytes(HEAD) + frame + bytes(64), 'packet')
    state = {'data': pkt + HEAD, 'end': pkt + HEAD + len(frame)}
    ctx = mem.alloc(bytes(24), 'ctx')
    mapaddr = {}
    for name, m in maps.items():
        mapaddr[name] = mem.alloc(bytes(8), 'map:' + name)
    byaddr = {a >> 32: maps[n] for n, a in mapaddr.items()}
    ro = {n: mem.alloc(d, n) for n, d in rodata.items()}
    scratch = mem.alloc(bytes(4096), 'ringbuf')
    start = {name: (s, i) for (s, i), name in funcs.items()}
    sec, pc = start[entry[1]]
    regs = [0] * 11
    regs[1] = ctx
    stack = mem.alloc(bytes(512), 'stack0')
    regs[10] = stack + 512
    frames = []
    count = collections.Counter()
    helpers = collections.Counter()
    lines = collections.Counter()
    LINES.append(lines)
    steps = 0
    fname = entry[1]
    cur_func = [fname]

    def ctx_load(off):
        if off == 0: return state['data']
        if off == 4: return state['end']
        if off == 12: return ifindex
        return 0

    def helper(n):
        r1, r2, r3, r4, r5 = regs[1:6]
        if n == 1:
            m = byaddr[r1 >> 32]
            k = mem.read(r2, m.ks)
            helpers['lookup:' + m.name + ':' + m.type] += 1
            return m.lookup(k)
        if n == 2:
            m = byaddr[r1 >> 32]
            return m.update(mem.read(r2, m.ks), mem.read(r3, m.vs))
        if n == 3:
            return 0
        if n == 23:
            return 4
        if n == 44:  # xdp_adjust_head
            state['data'] += s64(r2); return 0
        if n == 65:
            state['end'] += s64(r2); return 0
        if n == 160 or n == 5:
            return now
        if n == 118:  # jiffies64, at HZ 250
            return now // 4_000_000
        if n == 188:
            return state['end'] - state['data']
        if n == 131:
            return scratch
        if n in (130, 132, 133):
            return 0
        if n == 8:  # smp_processor_id
            return 0
        if n == 69:  # fib_lookup(ctx, params, plen, flags): success, or the MTU for a probe
            tot = mem.load(r2 + 6, 2)
            if tot == 0xffff:
                mem.store(r2 + 6, 2, 1500)
                return 8
            mem.store(r2 + 8, 4, ifindex)
            for i, byte in enumerate(bytes.fromhex('02000000aa01' '02000000bb02')):
                mem.store(r2 + 52 + i, 1, byte)
            return 0
        raise Exception(f'helper {n} not simulated')

    while True:
        steps += 1
        if steps > 200000:
            raise Exception('too many steps')
        ins = secs[sec][pc]
        b, reloc, srcl = ins
        lines[(cur_func[-1][-20:], srcl)] += 1
        op = b[0]; dst = b[1] & 0xf; src = b[1] >> 4
        off = struct.unpack('<h', b[2:4])[0]
        imm = struct.unpack('<i', b[4:8])[0]
        count[cur_func[-1]] += 1
        if trace:
            print(f'{sec}:{pc} {b[:8].hex()} r0={regs[0]:#x} r1={regs[1]:#x} r2={regs[2]:#x} r3={regs[3]:#x}')
        cls = op & 7
        npc = pc + 1
        if op == 0x18:  # ld_imm64
            hi = struct.unpack('<i', b[12:16])[0]
            v = (imm & 0xffffffff) | ((hi & 0xffffffff) << 32)
            if reloc:
                if reloc in mapaddr:
                    v = mapaddr[reloc]
                elif reloc in ro:
                    v = ro[reloc] + (imm & 0xffffffff)
                elif reloc == '.text':
                    # A function's address (a bpf_loop callback), loaded whether or not
                    # the path calls the helper: a marker, not followed.
                    v = 0x7e47_0000_0000 + (imm & 0xffffffff)
                else:
                    raise Exception('reloc ' + reloc)
            regs[dst] = v
            npc = pc + 2
        elif cls in (4, 7):  # alu
            a64 = cls == 7
            o = op & 0xf0
            x = op & 8
            if o == 0xd0:  # endian
                v = regs[dst]
                if cls == 7:  # bswap
                    n = imm // 8
                    v = int.from_bytes((v & ((1 << imm) - 1)).to_bytes(n, 'little'), 'big')
                elif x:  # to be
                    n = imm // 8
                    v = int.from_bytes((v & ((1 << imm) - 1)).to_bytes(n, 'little'), 'big')
                else:
                    v = v & ((1 << imm) - 1)
                regs[dst] = v
            else:
                sv = regs[src] if x else (imm & M64)
                dv = regs[dst]
                if not a64:
                    sv &= 0xffffffff; dv &= 0xffffffff
                    bits = 32
                else:
                    bits = 64
                mask = (1 << bits) - 1
                if o == 0x00: r = dv + sv
                elif o == 0x10: r = dv - sv
                elif o == 0x20: r = dv * sv
                elif o == 0x30: r = dv // sv if sv else 0
                elif o == 0x40: r = dv | sv
                elif o == 0x50: r = dv & sv
                elif o == 0x60: r = dv << (sv & (bits - 1))
                elif o == 0x70: r = (dv & mask) >> (sv & (bits - 1))
                elif o == 0x80: r = -dv
                elif o == 0x90: r = dv % sv if sv else dv
                elif o == 0xa0: r = dv ^ sv
                elif o == 0xb0:
                    if off:  # movsx
                        v = sv & ((1 << off) - 1)
                        if v >> (off - 1): v -= 1 << off
                        r = v
                    else:
                        r = sv
                elif o == 0xc0:
                    v = dv & mask
                    if v >> (bits - 1): v -= 1 << bits
                    r = v >> (sv & (bits - 1))
                else:
                    raise Exception(f'alu op {op:#x}')
                regs[dst] = r & mask
        elif cls in (5, 6):
            o = op & 0xf0
            if o == 0x80:  # call
                if src == 0:
                    helpers[imm] += 1
                    regs[0] = helper(imm) & M64
                elif src == 1:
                    if reloc == '.text':
                        tsec, tpc = '.text', imm + 1
                    elif reloc:
                        tsec, tpc = start[reloc]
                    else:
                        tsec, tpc = sec, pc + imm + 1
                    name = funcs.get((tsec, tpc), f'{tsec}:{tpc}')
                    helpers['bpf2bpf:' + name[-24:]] += 1
                    frames.append((sec, npc, regs[6:10], regs[10]))
                    nst = mem.alloc(bytes(512), 'stack')
                    regs[10] = nst + 512
                    cur_func.append(name)
                    sec, pc = tsec, tpc
                    continue
                else:
                    raise Exception('kfunc')
            elif o == 0x90:  # exit
                if not frames:
                    return regs[0], count, helpers, steps, mem.read(state['data'], state['end'] - state['data'])
                sec, npc, saved, r10 = frames.pop()
                regs[6:10] = saved; regs[10] = r10
                cur_func.pop()
            else:
                x = op & 8
                a = regs[dst]; bv = regs[src] if x else (imm & M64)
                if cls == 6:
                    a &= 0xffffffff; bv &= 0xffffffff; bits = 32
                else:
                    bits = 64
                def sg(v):
                    v &= (1 << bits) - 1
                    return v - (1 << bits) if v >> (bits - 1) else v
                a &= (1 << bits) - 1; bv &= (1 << bits) - 1
                if o == 0x00: t = True
                elif o == 0x10: t = a == bv
                elif o == 0x20: t = a > bv
                elif o == 0x30: t = a >= bv
                elif o == 0x40: t = (a & bv) != 0
                elif o == 0x50: t = a != bv
                elif o == 0x60: t = sg(a) > sg(bv)
                elif o == 0x70: t = sg(a) >= sg(bv)
                elif o == 0xa0: t = a < bv
                elif o == 0xb0: t = a <= bv
                elif o == 0xc0: t = sg(a) < sg(bv)
                elif o == 0xd0: t = sg(a) <= sg(bv)
                else: raise Exception(f'jmp {op:#x}')
                if t:
                    npc = pc + 1 + (imm if (o == 0x00 and cls == 6) else off)
        elif cls == 1:  # ldx
            n = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}[op & 0x18]
            addr = (regs[src] + off) & M64
            if addr >> 32 == ctx >> 32:
                v = ctx_load(addr & 0xffffffff)
            else:
                v = mem.load(addr, n)
            if op & 0xe0 == 0x80:  # memsx
                if v >> (8 * n - 1): v -= 1 << (8 * n)
            regs[dst] = v & M64
        elif cls == 3 or cls == 2:
            n = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}[op & 0x18]
            addr = (regs[dst] + off) & M64
            if op & 0xe0 == 0xc0:  # atomic
                old = mem.load(addr, n)
                sv = regs[src]
                k = imm & 0xf0
                if imm in (0x00, 0x01): new = old + sv
                elif k == 0x40: new = old | sv
                elif k == 0x50: new = old & sv
                elif k == 0xa0: new = old ^ sv
                elif imm == 0xe1: new = sv
                else: raise Exception('cmpxchg')
                mem.store(addr, n, new)
                if imm & 1:
                    regs[src] = old
            else:
                v = regs[src] if cls == 3 else (imm & M64)
                mem.store(addr, n, v)
        else:
            raise Exception(f'op {op:#x}')
        pc = npc


def count_main(a):
    secs, funcs = load_obj(a.objdump)
    md = json.load(open(a.maps))
    rodata = {k: bytes.fromhex(v) for k, v in md.get('sections', {}).items()}
    mem = Mem()
    maps = {sym: Map(mem, info, dump) for sym, (info, dump) in md['maps'].items()}
    clock = [md['now']]

    def once(frame):
        # 20 jiffies pass between frames: the per-CPU clock measures its rate by the third.
        clock[0] += 80_000_000
        return run(mem, secs, funcs, maps, rodata, frame, a.ifindex, clock[0], trace=a.trace)

    frame = open(a.frame, 'rb').read()
    if a.warm:
        before = {n: set(m.entries) for n, m in maps.items()}
        for _ in range(a.warm_count):
            once(open(a.warm, 'rb').read())
        if a.forget:
            for n, m in maps.items():
                if m.type in ('lru_hash', 'hash'):
                    for k in list(m.entries):
                        if k not in before[n]:
                            del m.entries[k]
    action, count, helpers, steps, _ = once(frame)
    print('action', XDP_NAMES.get(action, action), 'instructions', steps)
    for f, n in count.most_common():
        print(f'  {n:5} {f}')
    for h, n in sorted(helpers.items(), key=str):
        print('  call', HELPERS.get(h, h) if isinstance(h, int) else h, n)
    if a.lines:
        for l, n in sorted(LINES[-1].items(), key=str):
            print(f'{n:5} {l[0]} {l[1]}')


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='cmd', required=True)
    d = sub.add_parser('dump', help="the maps of the newest loaded lb_xdp, and OBJ's .rodata")
    d.add_argument('obj', help='the eBPF object lb_xdp was loaded from')
    d.add_argument('out', help='JSON file to write')
    c = sub.add_parser('count', help='run FRAME through lb_xdp, counting instructions')
    c.add_argument('objdump', help='llvm-objdump -dr -l of the object')
    c.add_argument('maps', help="dump's JSON")
    c.add_argument('frame', help='the frame, raw bytes')
    c.add_argument('--ifindex', type=int, default=2, help='ingress and FIB ifindex')
    c.add_argument('--warm', help='a frame to run first (fills caches: next hops, ...)')
    c.add_argument('--warm-count', type=int, default=3,
                   help='how many times the warm-up frame runs (default 3: caches and clock)')
    c.add_argument('--forget', action='store_true',
                   help='drop the hash entries the warm-up frame made (its connection)')
    c.add_argument('--lines', action='store_true', help='instructions per source line')
    c.add_argument('--trace', action='store_true', help='every instruction')
    a = ap.parse_args()
    if a.cmd == 'dump':
        dump_main(a.obj, a.out)
    else:
        count_main(a)


if __name__ == '__main__':
    main()
