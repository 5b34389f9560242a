#!/usr/bin/env bash
# Build the fused CPU kernel with AddressSanitizer (+ UndefinedBehaviorSanitizer) in a
# temporary copy of the repository and run its tests against that build.
# See docs/asan.md, or run with --help.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/asan_check.sh [options] [PYTEST_ARGS...]

Builds the C extension adopt._kernels._adopt_cpu with AddressSanitizer and (when the
compiler supports it) UndefinedBehaviorSanitizer in a temporary copy of the repository,
never in place, then runs the kernel's tests against that build with the sanitizer runtime
preloaded into Python:

  tests/test_fused_cpu.py  tests/test_fused_cpu_step.py  tests/test_variants.py (the two-pass
  cautious step)  tests/test_fused_state_cpu.py (the low-memory state step and its checks)
  tests/test_stochastic_rounding.py (the kernel's stochastic-rounding loops; its compiled
  tests, which never call the kernel, are left out)  tests/test_memory_safety.py (if present)

Any sanitizer report (heap-buffer-overflow, use-after-free, misaligned load, signed
overflow, ...) or failing test makes the exit status non-zero. The last line printed is a
one-line summary. Exit status: 0 clean, 1 a sanitizer report or a test failure, 2 the
sanitized build or its set-up failed.

options:
  --repo DIR      repository to copy (default: the one this script is in)
  --commit REF    copy the committed tree at REF (git archive) instead of the working tree
                  (the default copies tracked and untracked, not ignored, files as they are
                  on disk, so uncommitted edits are checked too)
  --no-ubsan      AddressSanitizer only
  --keep          keep the temporary copy, its build and logs (always kept on a finding)
  -h, --help      this text
  PYTEST_ARGS     passed on to pytest after the test files, e.g. -x, -k first_step, -q

environment:
  ASAN_CC         compiler (default: gcc; its own libasan is the one preloaded)
  PYTHON          the Python that builds and runs the tests (default: python on PATH)
  ASAN_OPTIONS, UBSAN_OPTIONS
                  appended to this script's settings, so they can override them
  ADOPT_ASAN_TMP  parent folder of the temporary copy (default: $TMPDIR or /tmp)

example:
  scripts/asan_check.sh                 # about a minute or two on 2 cores
  scripts/asan_check.sh -x -k bfloat16  # stop at the first failure, bfloat16 tests only
EOF
}

die() { echo "asan_check: SETUP FAILED: $*"; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo=""
commit=""
ubsan=1
keep=0
pytest_args=()
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --repo) [[ $# -ge 2 ]] || die "--repo needs a folder"; repo="$2"; shift 2 ;;
        --commit) [[ $# -ge 2 ]] || die "--commit needs a revision"; commit="$2"; shift 2 ;;
        --no-ubsan) ubsan=0; shift ;;
        --keep) keep=1; shift ;;
        --) shift; pytest_args+=("$@"); break ;;
        *) pytest_args+=("$1"); shift ;;
    esac
done

repo="$(git -C "${repo:-$here}" rev-parse --show-toplevel 2>/dev/null)" || die "not a git repository: ${repo:-$here}"
[[ -f "$repo/setup.py" ]] || die "no setup.py in $repo"
cc="${ASAN_CC:-gcc}"
command -v "${cc%% *}" >/dev/null || die "compiler not found: $cc"
python="${PYTHON:-python}"
command -v "$python" >/dev/null || die "python not found: $python"

libasan="$($cc -print-file-name=libasan.so)"
[[ "$libasan" == /* && -e "$libasan" ]] || die "$cc has no libasan.so (got '$libasan'); install its sanitizer runtime (Debian: libasan8)"
libasan="$(readlink -f "$libasan")"
# libstdc++ is preloaded after libasan: python itself is C, so without it ASan's __cxa_throw
# interceptor finds no real function and aborts at the first C++ exception torch throws (a
# RuntimeError from autograd, say) instead of letting it become a Python exception.
libstdcxx="$(readlink -f "$($cc -print-file-name=libstdc++.so)")"
[[ -e "$libstdcxx" ]] || die "$cc has no libstdc++.so (got '$libstdcxx')"

work="$(mktemp -d "${ADOPT_ASAN_TMP:-${TMPDIR:-/tmp}}/adopt-asan.XXXXXX")"
copy="$work/repo"
reports="$work/reports"
mkdir -p "$copy" "$reports"
cleanup() { if ((keep)); then echo "asan_check: kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT

# ---- 1. a copy of the repository ------------------------------------------------------
if [[ -n "$commit" ]]; then
    git -C "$repo" archive --format=tar "$commit" | tar -x -C "$copy" || die "git archive $commit failed"
    echo "asan_check: copied $repo at $(git -C "$repo" rev-parse --short "$commit") to $copy"
else
    # Tracked and untracked files that git does not ignore (so no built .so, no build/),
    # skipping tracked files deleted in the working tree.
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [[ -f "$f" ]] && printf '%s\0' "$f"; done |
        tar --null -T - -cf -) | tar -x -C "$copy" || die "copying the working tree failed"
    echo "asan_check: copied the working tree of $repo to $copy"
fi

# ---- 2. the sanitized build -----------------------------------------------------------
sanitizers="address"
if ((ubsan)); then
    probe="$work/probe"
    mkdir -p "$probe"
    printf 'int f(int x) { return x + 1; }\n' >"$probe/p.c"
    if $cc -fsanitize=address,undefined -shared -fPIC "$probe/p.c" -o "$probe/p.so" 2>/dev/null; then
        sanitizers="address,undefined"
    else
        echo "asan_check: $cc cannot build with -fsanitize=undefined; AddressSanitizer only"
    fi
fi
# The sanitizer flags go into CC itself: setup.py probes its flags by compiling AND linking
# small programs, and the link of those probes does not see CFLAGS/LDFLAGS, so with the
# flags only there every probe (OpenMP, target_clones, ...) would fail and the build would
# differ from the normal one. setup.py's own -O3 comes after CFLAGS and stays in effect.
san_flags="-fsanitize=$sanitizers -fno-omit-frame-pointer"
[[ "$sanitizers" == *undefined* ]] && san_flags+=" -fno-sanitize-recover=undefined"
build_log="$work/build.log"
echo "asan_check: building with $cc $san_flags -g (log: $build_log)"
(
    cd "$copy"
    CC="$cc $san_flags" CFLAGS="-g" LDFLAGS="-g" ADOPT_DEBUG=1 \
        "$python" setup.py build_ext --inplace
) >"$build_log" 2>&1 || { tail -n 30 "$build_log"; keep=1; die "the sanitized build failed (see $build_log)"; }

# The extension is optional in setup.py: a failed compile does not fail the build. Check.
shopt -s nullglob
sos=("$copy"/src/adopt/_kernels/_adopt_cpu*.so)
shopt -u nullglob
if ((${#sos[@]} != 1)); then
    grep -E "error:|warning:" "$build_log" | tail -n 20 || true
    keep=1
    die "the build produced ${#sos[@]} kernel .so files in $copy/src/adopt/_kernels (expected 1; see $build_log)"
fi
so="${sos[0]}"
grep -a -q "__asan_init" "$so" || die "$so is not instrumented (no __asan_init): the flags did not reach the compiler"
if grep -q -E "(^|[^-])warning:" "$build_log"; then
    echo "asan_check: compiler warnings in the sanitized build:"
    grep -E "(^|[^-])warning:" "$build_log" | sort -u | sed 's/^/  /'
fi

# ---- 3. the environment the tests run in ----------------------------------------------
# detect_leaks=0: CPython and torch keep allocations until exit by design, so leak reports
# would all be theirs. halt_on_error=1: stop at the first report. ASan's log_path: every
# process (pytest and the Python subprocesses some tests start) writes its reports to a file
# here, so none is lost in a subprocess's captured stderr. GCC's UBSan ignores log_path and
# writes to the process's stderr, so pytest runs with --capture=sys: Python-level output of
# the tests is still captured, but what C code writes to file descriptor 2 reaches the log
# even when the sanitizer ends the process in the middle of a test.
plugin_dir="$work/plugin"
mkdir -p "$plugin_dir"
cat >"$plugin_dir/adopt_asan_check_plugin.py" <<'EOF'
"""pytest plugin of scripts/asan_check.sh: refuse to run unless the sanitized kernel is loaded."""

import importlib
import os

import pytest

_loaded = []


def pytest_configure(config):
    expected = os.path.realpath(os.environ["ADOPT_ASAN_EXPECTED_SO"])
    try:
        kernel = importlib.import_module("adopt._kernels._adopt_cpu")
    except ImportError as exc:
        raise pytest.UsageError(f"asan_check: the sanitized kernel does not import: {exc}") from None
    if os.path.realpath(kernel.__file__) != expected:
        raise pytest.UsageError(f"asan_check: imported {kernel.__file__}, not the sanitized {expected}")
    fused = importlib.import_module("adopt._fused")
    loader = getattr(fused, "_cpu_kernel", None)
    if loader is not None and loader() is not kernel:
        raise pytest.UsageError("asan_check: adopt._fused did not load the sanitized kernel (fell back?)")
    _loaded.append(kernel.__file__)


def pytest_runtest_setup(item):
    # A sanitizer aborts the process mid-test, before pytest reports it: leave its name.
    with open(os.environ["ADOPT_ASAN_CURRENT_TEST"], "w") as f:
        f.write(item.nodeid)


def pytest_report_header(config):
    return [f"asan_check: sanitized kernel {_loaded[0]}"]
EOF

export LD_PRELOAD="$libasan:$libstdcxx${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:print_summary=1:log_path=$reports/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:print_summary=1:log_path=$reports/ubsan${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONPATH="$copy/src:$plugin_dir"
export ADOPT_ASAN_EXPECTED_SO="$so"
export ADOPT_ASAN_CURRENT_TEST="$work/current_test"
export PYTHONDONTWRITEBYTECODE=1

loaded="$(cd "$work" && "$python" -c '
import importlib, sys
k = importlib.import_module("adopt._kernels._adopt_cpu")
maps = open("/proc/self/maps").read()
print(k.__file__)
print("libasan-mapped" if "libasan" in maps else "libasan-missing")
' 2>&1)" || { echo "$loaded"; cat "$reports"/* 2>/dev/null || true; keep=1; die "importing the sanitized kernel under LD_PRELOAD=$libasan failed"; }
loaded_so="$(sed -n 1p <<<"$loaded")"
[[ "$(realpath "$loaded_so")" == "$(realpath "$so")" ]] || die "python imported $loaded_so, not the sanitized $so"
[[ "$(sed -n 2p <<<"$loaded")" == "libasan-mapped" ]] || die "libasan is not loaded in python"
echo "asan_check: sanitized kernel: $loaded_so"
echo "asan_check: runtime: LD_PRELOAD=$libasan:$libstdcxx"

# ---- 4. the tests ---------------------------------------------------------------------
tests=(tests/test_fused_cpu.py tests/test_fused_cpu_step.py tests/test_variants.py tests/test_fused_state_cpu.py
       tests/test_stochastic_rounding.py)
# torch.compile runs of the torch-op paths: they never call the kernel.
deselect=(--deselect tests/test_stochastic_rounding.py::test_compiled_step_matches_eager)
[[ -f "$copy/tests/test_memory_safety.py" ]] && tests+=(tests/test_memory_safety.py)
for t in "${tests[@]}"; do [[ -f "$copy/$t" ]] || die "missing $t in the copy"; done
test_log="$work/pytest.log"
echo "asan_check: running pytest ${tests[*]} ${pytest_args[*]:-}"
set +e
(cd "$copy" && "$python" -m pytest -p adopt_asan_check_plugin -p no:cacheprovider --capture=sys \
    "${tests[@]}" "${deselect[@]}" "${pytest_args[@]}") 2>&1 |
    tee "$test_log"
rc=${PIPESTATUS[0]}
set -e

# ---- 5. the verdict -------------------------------------------------------------------
shopt -s nullglob
found=("$reports"/*)
shopt -u nullglob
# pytest's last line, "=== 3 failed, 90 passed in 60s ===" (or without the = under -q).
tally="$(grep -E "^=* ?[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran" "$test_log" | tail -n 1 |
    sed -E 's/^=+ //; s/ =+$//' || true)"
# UBSan's reports are in the pytest log ("file.c:12:5: runtime error: ..."), ASan's in files.
ub_first="$(grep -m 1 -E "runtime error:|ERROR: (Address|UndefinedBehavior)Sanitizer" "$test_log" || true)"
if ((${#found[@]})) || [[ -n "$ub_first" ]]; then
    keep=1
    if ((${#found[@]})); then
        echo
        echo "asan_check: ${#found[@]} sanitizer report file(s) in $reports:"
        for f in "${found[@]}"; do
            echo "---- $f"
            cat "$f"
        done
    fi
    first="$ub_first"
    ((${#found[@]})) && [[ -z "$first" || "$first" != *"runtime error:"* ]] &&
        first="$(grep -h -m 1 "^SUMMARY:" "${found[@]}" | head -n 1 || true)"
    current="$(cat "$work/current_test" 2>/dev/null || true)"
    echo "asan_check: FAIL ($sanitizers): sanitizer report: ${first:-see above}${current:+ (during $current)}; pytest exit $rc${tally:+ ($tally)}; logs in $work"
    exit 1
fi
if ((rc != 0)); then
    echo "asan_check: FAIL ($sanitizers): no sanitizer report, but pytest exited $rc${tally:+ ($tally)}"
    exit 1
fi
echo "asan_check: PASS ($sanitizers): no sanitizer report; ${tally:-pytest passed}"
