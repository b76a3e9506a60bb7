"""Statistics of an optimized XLA HLO module's text, and of XLA's out-of-memory compile errors (for
unimedvl-compile, aot.py; docs/compile.md "The report").

  hlo_collectives  all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute: instructions, bytes,
                   and how often they run per step (loops times their trip counts)
  hlo_flops        FLOPs of the dots and convolutions, once each and per step
  kernel_calls     Pallas kernels compiled for the device (Mosaic TPU, Triton, Mosaic GPU custom calls)
  parse_oom        per-device figures and the largest buffers of a RESOURCE_EXHAUSTED message

Pure text parsing (no JAX): the formats are those XLA prints with `compiled.as_text()` (jaxlib 0.10.2, XLA:TPU of
libtpu 0.0.42 and XLA:GPU); tests/test_compile_cli.py holds small examples of each form handled.
"""

from __future__ import annotations

import math
import re

import numpy as np

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# bytes per element of HLO primitive types (sub-byte types as fractions; token / opaque 0)
_ELEMENT_BYTES = {"pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                  "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                  "c128": 16}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
# `[ROOT] %name = <shape> <opcode>(` : the shape may be a tuple with spaces, the opcode is the last word before "("
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\(")
_COMPUTATION = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEES = re.compile(r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string: an array `bf16[16,3584]{1,0}` or a tuple of them (layouts and tiling ignored;
    element types an f8 variant count 1 byte)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        size = 1 if dtype.startswith("f8") else _ELEMENT_BYTES.get(dtype, 0)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return int(math.ceil(total))


def _collective_kind(opcode: str) -> str | None:
    """The COLLECTIVES kind of an opcode, counting an async pair once (at its -done) and sync ops as they are."""
    base = opcode.removesuffix("-done")
    if base in COLLECTIVES and not opcode.endswith("-start"):
        return base
    return None


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """{computation name: its instruction lines} of an HLO module's text, and the ENTRY computation's name."""
    computations: dict[str, list[str]] = {}
    entry = current = None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if current is None and head and not _INSTRUCTION.match(line):
            current = head.group(2)
            computations[current] = []
            entry = current if head.group(1) else entry
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            computations[current].append(line)
    return computations, entry


def _instructions(lines: list[str]) -> dict[str, tuple[str, str, list[str], str]]:
    """{name: (shape, opcode, operand names, line)} of a computation's instruction lines."""
    out = {}
    for line in lines:
        m = _INSTRUCTION.match(line)
        if m:
            args = re.search(rf"{re.escape(m.group(3))}\((.*?)\)", line[m.end(2):])
            names = re.sub(r"/\*.*?\*/", "", args.group(1)).split(",") if args else []
            out[m.group(1)] = (m.group(2), m.group(3), [n.strip().split()[-1].lstrip("%") for n in names if n.strip()],
                               line)
    return out


def _source(name: str, instructions, passthrough: tuple[str, ...]):
    """The first instruction behind `name` that is not one of the `passthrough` opcodes (followed through their first
    operand, at most 8 deep): (shape, opcode, operands, line), or None."""
    for _ in range(8):
        if name not in instructions:
            return None
        shape, opcode, operands, line = instructions[name]
        if opcode not in passthrough:
            return shape, opcode, operands, line
        if not operands:
            return None
        name = operands[0]
    return None


def _integer_constant(name: str, instructions) -> int | None:
    """The value of an integer scalar constant (through copies / bitcasts / converts), else None."""
    found = _source(name, instructions, ("copy", "bitcast", "convert"))
    if found is None or found[1] != "constant":
        return None
    m = re.search(r"constant\((-?\d+)\)", found[3])
    return int(m.group(1)) if m and re.match(r"[su]\d+\[\]", found[0]) else None


def _tuple_index(name: str, instructions) -> int | None:
    """i when `name` is get-tuple-element(parameter, index=i) (through copies / bitcasts), else None."""
    found = _source(name, instructions, ("copy", "bitcast"))
    if found is None or found[1] != "get-tuple-element":
        return None
    m = re.search(r"index=(\d+)", found[3])
    return int(m.group(1)) if m else None


def _trip_count(line: str, computations, caller: dict) -> int | None:
    """Iterations of a while instruction: XLA's known_trip_count (XLA:GPU writes it), else read off the loop (XLA:TPU's
    HLO has no known_trip_count): a condition `compare(get-tuple-element(p, index=i), constant(N)), direction=LT`,
    a body whose result tuple holds add(element i, constant(step)) at i, and element i of the initial tuple
    (a constant start, or 0): ceil((N - start) / step). None when the loop is not of that form."""
    known = _TRIP_COUNT.search(line)
    if known:
        return int(known.group(1))
    names = re.search(r"condition=%?([\w.\-]+), body=%?([\w.\-]+)", line)
    if not names or names.group(1) not in computations or names.group(2) not in computations:
        return None
    cond, body = _instructions(computations[names.group(1)]), _instructions(computations[names.group(2)])
    root = next((v for v in cond.values() if v[3].lstrip().startswith("ROOT")), None)
    if root is None or root[1] != "compare" or "direction=LT" not in root[3] or len(root[2]) != 2:
        return None
    index, limit = _tuple_index(root[2][0], cond), _integer_constant(root[2][1], cond)
    result = next((v for v in body.values() if v[3].lstrip().startswith("ROOT")), None)
    if index is None or limit is None or result is None or result[1] != "tuple" or index >= len(result[2]):
        return None
    update = body.get(result[2][index])
    if update is None or update[1] != "add" or len(update[2]) != 2:
        return None
    a, b = update[2]
    step = _integer_constant(b, body) if _tuple_index(a, body) == index else (
        _integer_constant(a, body) if _tuple_index(b, body) == index else None)
    if not step or step < 1:
        return None
    init = re.search(r" while\(%?([\w.\-]+)\)", line)
    start = 0
    if init and init.group(1) in caller and caller[init.group(1)][1] == "tuple":
        elements = caller[init.group(1)][2]
        start = (_integer_constant(elements[index], caller) if index < len(elements) else None) or 0
    return max(0, -(-(limit - start) // step))


def _runs_per_step(computations, entry) -> tuple[dict[str, int], int]:
    """How often each computation runs per execution of the entry computation (while bodies and conditions times
    their trip count), and the number of while loops whose trip count is unknown (counted once)."""
    if entry is None:
        return dict.fromkeys(computations, 1), 0
    calls: dict[str, list[tuple[str, int]]] = {name: [] for name in computations}  # caller -> (callee, times)
    unknown = 0
    for name, lines in computations.items():
        instructions = None
        for line in lines:
            callees = _CALLEES.findall(line)
            for group in _BRANCHES.findall(line):
                callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
            trips = 1
            if " while(" in line:
                instructions = _instructions(lines) if instructions is None else instructions
                count = _trip_count(line, computations, instructions)
                unknown += count is None
                trips = 1 if count is None else count
            calls[name] += [(callee, trips) for callee in callees if callee in computations]
    callers = dict.fromkeys(computations, 0)
    for edges in calls.values():
        for callee, _ in edges:
            callers[callee] += 1
    runs = dict.fromkeys(computations, 0)
    runs[entry] = 1
    ready = [name for name, n in callers.items() if n == 0]  # HLO computations call each other as a DAG
    while ready:
        name = ready.pop()
        for callee, times in calls[name]:
            runs[callee] += runs[name] * times
            callers[callee] -= 1
            if callers[callee] == 0:
                ready.append(callee)
    return runs, unknown


def hlo_collectives(hlo_text: str) -> dict:
    """Collective ops of an optimized HLO module, per kind of COLLECTIVES:

      count / bytes                    each op once as it appears in the module, bytes = its result shape (the
                                       gathered / reduced / permuted output of one device; an async op at its
                                       -done, whose result is that output)
      executed_count / executed_bytes  the same weighted by how often the op runs per step: ops inside while
                                       loops (e.g. a scan over layers) times the loop's trip count (_trip_count;
                                       a loop whose count is not found counts once: `unknown_trip_counts` loops)
    """
    computations, entry = _computations(hlo_text)
    runs, unknown = _runs_per_step(computations, entry)
    stats = {k: dict(count=0, bytes=0, executed_count=0, executed_bytes=0) for k in COLLECTIVES}
    for name, lines in computations.items():
        for line in lines:
            m = _INSTRUCTION.match(line)
            kind = m and _collective_kind(m.group(3))
            if not kind:
                continue
            size, times = shape_bytes(m.group(2)), runs.get(name, 0)
            s = stats[kind]
            s["count"] += 1
            s["bytes"] += size
            s["executed_count"] += times
            s["executed_bytes"] += times * size
    return {**stats, "unknown_trip_counts": unknown}


def _dims(shape: str) -> list[int]:
    """The dimensions of an array shape string (the first array of a tuple)."""
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _window_taps(line: str, lhs: list[int], lhs_labels: str, out: list[int], out_labels: str) -> float:
    """Kernel taps per output element of a convolution that land on input elements (not on padding or the holes of
    an lhs dilation), averaged over the output positions: a product over the window's spatial dims."""
    window = re.search(r"window=\{([^}]*)\}", line)
    if not window:
        return 1.0
    attrs = dict(re.findall(r"(\w+)=([0-9x_\-]+)", window.group(1)))
    sizes = [int(v) for v in attrs["size"].split("x")]

    def per_dim(name, default):
        return [int(v) for v in attrs[name].split("x")] if name in attrs else [default] * len(sizes)

    stride, lhs_dilate, rhs_dilate = per_dim("stride", 1), per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
    pads = [int(p.split("_")[0]) for p in attrs["pad"].split("x")] if "pad" in attrs else [0] * len(sizes)
    taps = 1.0
    for j, k in enumerate(sizes):
        if str(j) not in lhs_labels or str(j) not in out_labels:
            return 1.0
        size_in, size_out = lhs[lhs_labels.index(str(j))], out[out_labels.index(str(j))]
        index = (np.arange(size_out)[:, None] * stride[j] + np.arange(k)[None, :] * rhs_dilate[j] - pads[j])
        valid = (index >= 0) & (index <= (size_in - 1) * lhs_dilate[j]) & (index % lhs_dilate[j] == 0)
        taps *= float(valid.sum()) / max(size_out, 1)
    return taps


def _matmul_flops(opcode: str, shape: str, line: str, shapes: dict[str, str]) -> float:
    """2 · multiply-adds of a dot or convolution instruction (XLA:TPU writes dots as convolutions, batched and
    collective matmuls with windows over padded or dilated dims): output elements × the contracted size: a dot's
    lhs contracting dims; a convolution's input features per group × the kernel taps that land on input
    elements (_window_taps)."""
    operands = re.search(rf"{opcode}\(([^)]*)\)", line)
    names = [o.strip().split()[-1].lstrip("%") for o in operands.group(1).split(",")] if operands else []
    if len(names) < 2 or names[0] not in shapes or names[1] not in shapes:
        return 0.0
    out = _dims(shape)
    if opcode == "dot":
        lhs = _dims(shapes[names[0]])
        dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line)
        contracted = math.prod(lhs[int(d)] for d in dims.group(1).split(",") if d) if dims else 1
        return 2.0 * math.prod(out) * contracted
    lhs, kernel = _dims(shapes[names[0]]), _dims(shapes[names[1]])
    labels = re.search(r"dim_labels=([^_]*)_([^-]*)->(\w+)", line)
    if not labels or "i" not in labels.group(2) or len(labels.group(2)) != len(kernel):
        return 0.0
    taps = _window_taps(line, lhs, labels.group(1), out, labels.group(3))
    return 2.0 * math.prod(out) * kernel[labels.group(2).index("i")] * taps


def hlo_flops(hlo_text: str) -> dict[str, float]:
    """Matmul FLOPs per device of an optimized HLO module (every dot and convolution, the frozen VAE's convolutions
    included): `static` each instruction once, `executed` weighted by how often it runs per step (while loops times
    their trip count, as for hlo_collectives). XLA's own cost_analysis counts a while body once, so with scanned
    layers it reports about one layer's share."""
    computations, entry = _computations(hlo_text)
    runs, _ = _runs_per_step(computations, entry)
    static = executed = 0.0
    for name, lines in computations.items():
        parsed = [(m, line) for line in lines if (m := _INSTRUCTION.match(line))]
        shapes = {m.group(1): m.group(2) for m, _ in parsed}
        for m, line in parsed:
            if m.group(3) in ("dot", "convolution"):
                flops = _matmul_flops(m.group(3), m.group(2), line, shapes)
                static += flops
                executed += runs.get(name, 0) * flops
    return {"static": static, "executed": executed}


# custom-call targets of compiled Pallas kernels: Mosaic on TPU, Triton and Mosaic on GPU
KERNEL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu")


def kernel_calls(hlo_text: str) -> int:
    """Custom calls of compiled Pallas kernels in an HLO module (KERNEL_TARGETS). A kernel run in interpret mode
    leaves none: it is lowered to ordinary HLO."""
    return sum(hlo_text.count(f'custom_call_target="{t}"') for t in KERNEL_TARGETS)


_SIZE = r"([0-9.]+)\s*([KMGT]?i?B?)"
_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit[:1].upper() if unit[:1].upper() in _UNITS else ""])


def parse_oom(message: str) -> dict:
    """Per-device figures and the largest buffers named by an XLA:TPU RESOURCE_EXHAUSTED compile error; fields a
    message lacks are left out. Two forms: the early check "the total memory required for HLO temporaries (X)
    exceeds available HBM (Y)" (temporaries only), and the buffer-assignment report "Used X of Y hbm. Exceeded hbm
    capacity by Z" with arguments, output, aliasing, HLO temp and "Largest program allocations in hbm" (size,
    operator, shape, allocation type of each)."""
    out: dict = {}
    patterns = {"used_bytes": rf"Used {_SIZE} of", "hbm_bytes": rf"(?:of {_SIZE} hbm|available HBM \({_SIZE}\))",
                "exceeded_bytes": rf"Exceeded hbm capacity by {_SIZE}", "argument_bytes": rf"arguments\s+{_SIZE}",
                "output_bytes": rf"Output size {_SIZE}", "alias_bytes": rf"shares {_SIZE} with arguments",
                "temp_bytes": rf"(?:HLO temp\s+{_SIZE}|for HLO temporaries \({_SIZE}\))",
                "reserved_bytes": rf"reserved\s+{_SIZE}", "program_bytes": rf"program\s+{_SIZE}"}
    for key, pattern in patterns.items():
        m = re.search(pattern, message)
        if m:
            number, unit = [g for g in m.groups() if g is not None][:2]
            out[key] = _bytes(number, unit)
    buffers = []
    for block in re.split(r"\n\s*\d+\.\s+Size:", message)[1:]:
        block = block.split("=====", 1)[0]
        size = re.match(rf"\s*{_SIZE}", block)
        shape = re.search(r"Shape:\s*(\S+)", block)
        op = re.search(r'op_name="([^"]*)"', block) or re.search(r"Operator:\s*(.*)", block)
        kind = re.search(r"Allocation type:\s*(.*)", block)
        buffers.append({"bytes": _bytes(size.group(1), size.group(2)) if size else None,
                        "shape": shape.group(1) if shape else None, "op": op.group(1).strip() if op else None,
                        "allocation": kind.group(1).strip() if kind else None})
    out["largest_buffers"] = buffers
    return out
