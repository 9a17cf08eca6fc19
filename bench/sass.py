"""Static reading of compiled GPU code: SASS (``cuobjdump -sass`` / ``nvdisasm``) and resource usage.

Used by ``python -m bench.static`` for the CUDA kernels and by ``bench/static_triton.py`` for Triton cubins.

- ``find_tool(name)``: cuobjdump / nvdisasm from PATH, else ``$CUDA_HOME/bin``, else the Triton wheel
  (``triton/backends/nvidia/bin/``).
- ``disassemble(path)``: SASS text of a cubin or an object file; ``split_functions(text)`` cuts it into
  ``{(arch, function): [Instruction]}``.
- ``hot_loop(instructions)``: the loop (the address range of a backward branch) holding the most MMA
  instructions (HMMA/HGMMA), the innermost one among equals; ``count_loop`` counts it.
- ``resource_usage(text)``: ``cuobjdump -res-usage`` per function and arch (registers, stack, local, shared).

The counts are static: every instruction between the loop's first address and its backward branch counts
once, conditional paths included, so they describe one iteration's code, not a measured execution.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

MMA_OPCODES = ("HMMA", "HGMMA")
BRANCH_OPCODES = ("BRA", "JMP")
INSTRUCTION_BYTES = 16  # every sm_80 / sm_90 SASS instruction
PLAIN_LOAD_OPCODES = ("LD", "LDS", "LDG")

_ARCH = re.compile(r"(?:code for|\.target)\s+sm_(\d+)")
_FUNCTION = re.compile(r"^\s*(?:Function\s*:\s*(\S+)|\.text\.(\S+):)\s*$")
_LABEL = re.compile(r"^\s*(\.L[\w.]+):")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_REGISTER = re.compile(r"^-?\|?R(\d+)")
_RESOURCE_FUNCTION = re.compile(r"^\s*Function\s+(\S+):\s*$")
_RESOURCE_FIELD = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


@dataclass(frozen=True)
class Instruction:
    """One SASS instruction: address, guard predicate (or ""), opcode with modifiers, operand text."""

    address: int
    predicate: str
    opcode: str
    operands: str

    @property
    def base(self) -> str:
        """The opcode without modifiers: "HMMA" for "HMMA.16816.F32.BF16"."""
        return self.opcode.split(".")[0]

    @property
    def modifiers(self) -> List[str]:
        return self.opcode.split(".")[1:]

    def operand_list(self) -> List[str]:
        """Operands split at top-level commas ("R4, [R2+0x10], c[0x0][0x28]" -> three)."""
        parts, depth, current = [], 0, ""
        for char in self.operands:
            if char in "[(":
                depth += 1
            elif char in "])":
                depth -= 1
            if char == "," and depth == 0:
                parts.append(current.strip())
                current = ""
            else:
                current += char
        return [part for part in (*parts, current.strip()) if part]


def find_tool(name: str) -> Optional[str]:
    """Path of a CUDA binary tool (cuobjdump, nvdisasm): PATH, $CUDA_HOME/bin, then the Triton wheel; or None."""
    on_path = shutil.which(name)
    if on_path:
        return on_path
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(cuda_home) / "bin" / name] if cuda_home else []
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    return next((str(path) for path in candidates if path.is_file() and os.access(path, os.X_OK)), None)


def run_cuobjdump(path: Path, flag: str) -> str:
    """Output of ``cuobjdump <flag> <path>`` (flag "-sass" or "-res-usage"); raises when the tool is missing."""
    tool = find_tool("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump not found on PATH, in $CUDA_HOME/bin or in the triton wheel")
    return subprocess.run([tool, flag, str(path)], check=True, capture_output=True, text=True).stdout


def disassemble(path: Path) -> str:
    """SASS text (``cuobjdump -sass``) of a cubin or an object file with embedded cubins."""
    return run_cuobjdump(path, "-sass")


def split_functions(sass: str, default_arch: int = 0) -> Dict[Tuple[int, str], List[Instruction]]:
    """{(arch, mangled function name): instructions in address order} of cuobjdump or nvdisasm output.

    Branch targets written as labels (nvdisasm's ```(.L_x_3)``) are rewritten to hex addresses.
    """
    functions: Dict[Tuple[int, str], List[Instruction]] = {}
    arch, current, pending_labels = default_arch, None, []
    labels: Dict[Tuple[int, str], Dict[str, int]] = {}
    for line in sass.splitlines():
        arch_match = _ARCH.search(line)
        if arch_match:
            arch = int(arch_match.group(1))
            continue
        function_match = _FUNCTION.match(line)
        if function_match:
            current = (arch, function_match.group(1) or function_match.group(2))
            functions[current], labels[current], pending_labels = [], {}, []
            continue
        label_match = _LABEL.match(line)
        if label_match and current is not None:
            pending_labels.append(label_match.group(1))
            continue
        instruction_match = _INSTRUCTION.match(line)
        if instruction_match and current is not None:
            address, predicate, opcode, operands = instruction_match.groups()
            functions[current].append(Instruction(int(address, 16), (predicate or "").strip(), opcode, operands.strip()))
            labels[current].update({label: int(address, 16) for label in pending_labels})
            pending_labels = []
    return {key: _resolve_labels(body, labels[key]) for key, body in functions.items()}


def _resolve_labels(instructions: List[Instruction], labels: Dict[str, int]) -> List[Instruction]:
    def resolved(instruction: Instruction) -> Instruction:
        operands = re.sub(r"`\((\.L[\w.]+)\)",
                          lambda m: hex(labels[m.group(1)]) if m.group(1) in labels else m.group(0), instruction.operands)
        return Instruction(instruction.address, instruction.predicate, instruction.opcode, operands)

    return [resolved(instruction) for instruction in instructions]


def branch_target(instruction: Instruction) -> Optional[int]:
    """Target address of a direct BRA/JMP, else None."""
    if instruction.base not in BRANCH_OPCODES:
        return None
    match = re.search(r"0x([0-9a-fA-F]+)", instruction.operands)
    return int(match.group(1), 16) if match else None


def _ends_block(instruction: Instruction) -> bool:
    return instruction.base in (*BRANCH_OPCODES, "BRX", "JMX", "EXIT", "RET", "BPT")


def _is_unconditional(instruction: Instruction) -> bool:
    return instruction.predicate in ("", "@PT") and "DIV" not in instruction.modifiers


def basic_blocks(instructions: List[Instruction]) -> Tuple[List[Tuple[int, int]], Dict[int, List[int]]]:
    """Basic blocks as (first index, last index) and each block's successor blocks (CALL falls through)."""
    index_of = {instruction.address: i for i, instruction in enumerate(instructions)}
    leaders = {0}
    for i, instruction in enumerate(instructions):
        target = branch_target(instruction)
        if target in index_of:
            leaders.add(index_of[target])
        if _ends_block(instruction) and i + 1 < len(instructions):
            leaders.add(i + 1)
    starts = sorted(leaders)
    blocks = [(start, end - 1) for start, end in zip(starts, [*starts[1:], len(instructions)])]
    block_of = {start: b for b, (start, _) in enumerate(blocks)}
    successors: Dict[int, List[int]] = {}
    for b, (_, last) in enumerate(blocks):
        instruction = instructions[last]
        target = branch_target(instruction)
        following = [b + 1] if b + 1 < len(blocks) else []
        if not _ends_block(instruction):
            successors[b] = following
        elif target in index_of:
            jump = [block_of[index_of[target]]]
            successors[b] = jump if _is_unconditional(instruction) else jump + following
        else:
            successors[b] = [] if _is_unconditional(instruction) else following
    return blocks, successors


def _dominators(successors: Dict[int, List[int]], count: int) -> List[int]:
    """Bit set of the dominators of every block reachable from block 0 (0 for unreachable blocks)."""
    reachable, stack = {0}, [0]
    while stack:
        for target in successors[stack.pop()]:
            if target not in reachable:
                reachable.add(target)
                stack.append(target)
    predecessors = {b: [p for p in reachable if b in successors[p]] for b in reachable}
    everything = (1 << count) - 1
    dominators = [everything if b in reachable else 0 for b in range(count)]
    dominators[0] = 1
    changed = True
    while changed:
        changed = False
        for b in sorted(reachable - {0}):
            meet = everything
            for p in predecessors[b]:
                meet &= dominators[p]
            if meet | (1 << b) != dominators[b]:
                dominators[b], changed = meet | (1 << b), True
    return dominators


def find_loops(instructions: List[Instruction]) -> List[List[int]]:
    """Instruction indices (ascending) of every natural loop: for each header (a block that dominates a
    predecessor jumping back to it), the header and the blocks that reach a back edge without passing it."""
    blocks, successors = basic_blocks(instructions)
    dominators = _dominators(successors, len(blocks))
    predecessors: Dict[int, List[int]] = {b: [] for b in range(len(blocks))}
    back_edges: Dict[int, List[int]] = {}
    for b, targets in successors.items():
        for target in targets:
            predecessors[target].append(b)
            if dominators[b] >> target & 1:
                back_edges.setdefault(target, []).append(b)
    loops = []
    for header, sources in back_edges.items():
        members, stack = {header}, list(sources)
        while stack:
            block = stack.pop()
            if block not in members:
                members.add(block)
                stack.extend(predecessors[block])
        loops.append(sorted(i for b in members for i in range(blocks[b][0], blocks[b][1] + 1)))
    return loops


def is_mma(instruction: Instruction) -> bool:
    return instruction.base in MMA_OPCODES


def hot_loop(instructions: List[Instruction]) -> Optional[List[Instruction]]:
    """Instructions (address order) of the loop with the most MMA instructions, the smallest among equals;
    None when no loop holds an MMA."""
    best, best_key = None, None
    for indices in find_loops(instructions):
        body = [instructions[i] for i in indices]
        key = (sum(map(is_mma, body)), -len(body))
        if key[0] > 0 and (best_key is None or key > best_key):
            best, best_key = body, key
    return best


def _register_span(instruction: Instruction) -> int:
    """How many consecutive registers the destination of `instruction` covers."""
    modifiers = instruction.modifiers
    if instruction.base in MMA_OPCODES:
        return 4 if "F32" in modifiers else 2
    if instruction.base == "LDSM":
        return next((int(m) for m in modifiers if m in ("1", "2", "4")), 1)
    if "128" in modifiers:
        return 4
    if "64" in modifiers or "WIDE" in modifiers:
        return 2
    return 1


def _first_register(operand: str) -> Optional[int]:
    match = _REGISTER.match(operand.strip())
    return int(match.group(1)) if match else None


def _mma_source_registers(instruction: Instruction) -> List[List[int]]:
    """Registers of the A and B operands of an HMMA ([] for RZ or descriptor operands)."""
    operands = instruction.operand_list()
    shape = next((m for m in instruction.modifiers if m.isdigit()), "16816")
    a_span, b_span = (4, 2) if shape.endswith("16") else (2, 1)
    sources = []
    for operand, span in zip(operands[1:3], (a_span, b_span)):
        first = _first_register(operand)
        sources.append([] if first is None else list(range(first, first + span)))
    return sources


def _destination(instruction: Instruction) -> Optional[range]:
    """Registers written by `instruction` (its first operand), or None for stores, branches and no register."""
    operands = instruction.operand_list()
    if not operands or instruction.base in BRANCH_OPCODES or instruction.base.startswith(("ST", "RED", "ATOM")):
        return None
    first = _first_register(operands[0])
    return None if first is None else range(first, first + _register_span(instruction))


def mma_operands_from_plain_loads(body: List[Instruction]) -> int:
    """How many HMMA A/B operands of the loop were last written by LD/LDS/LDG (not LDSM) inside the loop:
    for each operand register the nearest writer before the HMMA, looking back around the loop once."""
    destinations = [_destination(instruction) for instruction in body]

    def last_writer(position: int, register: int) -> Optional[Instruction]:
        for step in range(1, len(body) + 1):
            written = destinations[(position - step) % len(body)]
            if written is not None and register in written:
                return body[(position - step) % len(body)]
        return None

    count = 0
    for position, instruction in enumerate(body):
        if instruction.base != "HMMA":
            continue
        for registers in _mma_source_registers(instruction):
            writers = [last_writer(position, register) for register in registers]
            count += any(writer is not None and writer.base in PLAIN_LOAD_OPCODES for writer in writers)
    return count


def _source_registers(instruction: Instruction) -> set:
    """Registers an instruction reads: every register named in its operands but its destination's."""
    operands = instruction.operand_list()
    read = operands[1:] if _destination(instruction) is not None else operands
    return {int(register) for operand in read for register in re.findall(r"\bR(\d+)\b", operand)}


def loads_used_before_first_mma(body: List[Instruction]) -> int:
    """How many LDG/LD of one loop iteration (address order) have their result read before the iteration's
    first MMA: global round trips the tile's MMAs wait behind (LDG -> FSETP -> @P LDGSTS counts)."""
    first_mma = next((i for i, instruction in enumerate(body) if is_mma(instruction)), len(body))
    count = 0
    for i, load in enumerate(body[:first_mma]):
        written = set(_destination(load) or ()) if load.base in ("LD", "LDG") else set()
        count += any(written & _source_registers(later) for later in body[i + 1:first_mma])
    return count


def max_loads_in_flight(instructions: List[Instruction]) -> int:
    """The most global loads of a straight-line run issued before any of their results is used: LDG until an
    instruction reads one of their destination registers, LDGSTS until a DEPBAR waits for them (a branch
    target or branch ends the run, conservatively)."""
    best, loads, ldgsts, pending = 0, 0, 0, set()
    targets = {branch_target(instruction) for instruction in instructions}
    for instruction in instructions:
        if instruction.address in targets or instruction.base in BRANCH_OPCODES:
            best, loads, ldgsts, pending = max(best, loads + ldgsts), 0, 0, set()
        sources = {_first_register(operand.strip("[]")) for operand in instruction.operand_list()[1:]}
        if instruction.base == "DEPBAR" and ldgsts:
            best, ldgsts = max(best, loads + ldgsts), 0
        if pending & sources:
            best, loads, pending = max(best, loads + ldgsts), 0, set()
        if instruction.base == "LDG":
            loads += 1
            pending |= set(_destination(instruction) or ())
        elif instruction.base == "LDGSTS":
            ldgsts += 1
    return max(best, loads + ldgsts)


def is_loop_exit_call(body: List[Instruction], position: int) -> bool:
    """Whether body[position] is ptxas' loop exit (seen on sm_80): ``@P CALL.REL.NOINC`` to the instruction right
    after the unconditional back branch that follows it. NOINC pushes no return address: it leaves the loop (once,
    when P holds) with the warp kept converged; no function is called and nothing runs out of line."""
    call = body[position]
    if call.base != "CALL" or "NOINC" not in call.modifiers or position + 1 >= len(body):
        return False
    back = body[position + 1]
    target = re.search(r"0x([0-9a-fA-F]+)", call.operands)
    return (back.base == "BRA" and _is_unconditional(back) and target is not None
            and int(target.group(1), 16) == back.address + INSTRUCTION_BYTES)


def count_loop(body: List[Instruction]) -> dict:
    """Static counts of one loop: instructions, MMA, LDSM, LDGSTS, generic LD/ST, LDS/STS, BAR, CALL (ptxas' loop
    exits, is_loop_exit_call, apart), loads used before the first MMA, per MMA."""
    bases = [instruction.base for instruction in body]
    mma = sum(base in MMA_OPCODES for base in bases)
    exits = sum(is_loop_exit_call(body, position) for position in range(len(body)))
    return {
        "instructions": len(body),
        "mma": mma,
        "ldsm": bases.count("LDSM"),
        "ldgsts": bases.count("LDGSTS"),
        "generic_ld": bases.count("LD") + bases.count("LDG"),
        "generic_st": bases.count("ST") + bases.count("STG"),
        "lds": bases.count("LDS"),
        "sts": bases.count("STS"),
        "bar": bases.count("BAR"),
        "mma_operands_from_plain_loads": mma_operands_from_plain_loads(body),
        "calls": bases.count("CALL") - exits,
        "loop_exit_calls": exits,
        "loads_used_before_mma": loads_used_before_first_mma(body),
        "instructions_per_mma": round(len(body) / mma, 2) if mma else None,
        "ldsm_per_mma": round(bases.count("LDSM") / mma, 3) if mma else None,
    }


def ptxas_usage(text: str) -> Dict[Tuple[int, str], Dict[str, int]]:
    """{(arch, entry function): {"registers", "stack", "spill_stores", "spill_loads", "shared"}} from the
    ``ptxas -v`` (``nvcc -Xptxas -v``) log; "shared" is the static shared memory in bytes."""
    usage: Dict[Tuple[int, str], Dict[str, int]] = {}
    current, described = None, None
    for line in text.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)", line)
        if entry:
            current = (int(entry.group(2)), entry.group(1))
            usage[current] = {"registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0, "shared": 0}
            continue
        if current is None:
            continue
        properties = re.search(r"Function properties for (\S+)", line)
        if properties:  # the entry's own, or an out-of-line device function's that follows it
            described = properties.group(1)
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame and described == current[1]:
            usage[current].update(stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
                                  spill_loads=int(frame.group(3)))
        registers = re.search(r"Used (\d+) registers", line)
        if registers:
            usage[current]["registers"] = int(registers.group(1))
            shared = re.search(r"(\d+) bytes smem", line)
            usage[current]["shared"] = int(shared.group(1)) if shared else 0
    return usage


def resource_usage(text: str) -> Dict[Tuple[int, str], Dict[str, int]]:
    """{(arch, function): {"registers", "stack", "local", "shared"}} from ``cuobjdump -res-usage`` output."""
    usage: Dict[Tuple[int, str], Dict[str, int]] = {}
    arch, current = 0, None
    for line in text.splitlines():
        arch_match = re.match(r"^\s*arch\s*=\s*sm_(\d+)", line)
        if arch_match:
            arch = int(arch_match.group(1))
            continue
        function_match = _RESOURCE_FUNCTION.match(line)
        if function_match:
            current = (arch, function_match.group(1))
            continue
        fields = dict(_RESOURCE_FIELD.findall(line))
        if current is not None and "REG" in fields:
            usage[current] = {"registers": int(fields["REG"]), "stack": int(fields.get("STACK", 0)),
                              "local": int(fields.get("LOCAL", 0)), "shared": int(fields.get("SHARED", 0))}
            current = None
    return usage
