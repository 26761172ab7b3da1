"""Catalogue data beyond python3/bash: the `python` alias and compiled C/C++ kernels."""
from __future__ import annotations

import pytest

from sorna_agent.languages import CatalogueError, load_catalogue
from tests.helpers import pty_exchange, stderr_of, stdout_of

HELLO_C = b"""#include <stdio.h>
#include <unistd.h>
int twice(int x);
int main(void) {
    printf("hello from C, %d, uid %s\\n", twice(21), getuid() == 0 ? "root" : "other");
    return 0;
}
"""
TWICE_C = b"int twice(int x) { return 2 * x; }\n"


def _batch(harness, kernel_id, **opts):
    return harness.ok("execute", kernel_id=kernel_id, mode="batch", code="", opts=opts,
                      timeout=60)


def test_python_alias_runs_python3(harness):
    info = harness.wait_event(lambda e: e["type"] == "instance_started")["info"]
    assert {"python", "python3"} <= set(info["languages"])
    kernel_id = harness.create("python")
    assert stdout_of(harness.query(kernel_id, "import sys\nsys.version_info[0]")) == "3\n"
    assert harness.ok("list_kernels")[kernel_id]["lang"] == "python"
    harness.ok("upload_file", kernel_id=kernel_id, name="main.py", data=b"print('main')\n")
    assert stdout_of(_batch(harness, kernel_id, build="*", exec="*")) == "main\n"


def test_alias_must_name_a_language(tmp_path):
    bad = tmp_path / "languages.toml"
    bad.write_text('[py]\nalias_of = "nothing"\n')
    with pytest.raises(CatalogueError, match="alias_of"):
        load_catalogue(bad)
    bad.write_text('[py]\nalias_of = "py3"\nkind = "python"\n[py3]\nkind = "python"\n')
    with pytest.raises(CatalogueError, match="only `alias_of`"):
        load_catalogue(bad)


def test_language_left_out_when_its_tool_is_missing(tmp_path):
    path = tmp_path / "languages.toml"
    path.write_text('[x]\nkind = "program"\nrequires = ["no-such-compiler-here"]\n'
                    '[y]\nalias_of = "x"\n')
    assert load_catalogue(path) == {}


@pytest.mark.needs_gcc
def test_c_batch_builds_then_runs_as_the_kernel_user(harness):
    kernel_id = harness.create("c")
    harness.ok("upload_file", kernel_id=kernel_id, name="main.c", data=HELLO_C)
    harness.ok("upload_file", kernel_id=kernel_id, name="lib/twice.c", data=TWICE_C)
    # what the historic `lcc main.c lib/twice.c` sends: build and exec "*", twice
    result = _batch(harness, kernel_id, build="*", exec="*")
    assert result["status"] == "build-finished", result
    result = _batch(harness, kernel_id, build="*", exec="*")
    assert result["status"] == "finished"
    assert stdout_of(result) == "hello from C, 42, uid other\n", result
    # a custom exec reuses the binary
    result = _batch(harness, kernel_id, exec="./main | tr a-z A-Z")
    assert stdout_of(result) == "HELLO FROM C, 42, UID OTHER\n"


@pytest.mark.needs_gcc
def test_c_compile_error_is_reported(harness):
    kernel_id = harness.create("c")
    harness.ok("upload_file", kernel_id=kernel_id, name="main.c",
               data=b"int main(void) { return missing_name; }\n")
    result = _batch(harness, kernel_id, build="*", exec="*")
    assert result["status"] == "finished"
    assert "missing_name" in stderr_of(result) and "error" in stderr_of(result)
    assert "[build failed with exit code 1]" in stderr_of(result)


@pytest.mark.needs_gcc
def test_c_query_is_a_whole_program(harness):
    kernel_id = harness.create("c")
    harness.ok("upload_file", kernel_id=kernel_id, name="data.txt", data=b"from a file\n")
    code = ('#include <stdio.h>\n'
            'int main(void) {\n'
            '  char line[64]; FILE *f = fopen("data.txt", "r");\n'
            '  fgets(line, sizeof line, f); printf("read: %s", line); return 0;\n'
            '}\n')
    result = harness.query(kernel_id, code, timeout=60)
    assert result["status"] == "finished"
    assert stdout_of(result) == "read: from a file\n", result
    result = harness.query(kernel_id, "int main(void) { return }", timeout=60)
    assert "error" in stderr_of(result)
    # the query's own files stay out of a later batch build
    harness.ok("upload_file", kernel_id=kernel_id, name="main.c",
               data=b'#include <stdio.h>\nint main(void) { puts("batch"); return 0; }\n')
    assert _batch(harness, kernel_id, build="*", exec="*")["status"] == "build-finished"
    assert stdout_of(_batch(harness, kernel_id, build="*", exec="*")) == "batch\n"


@pytest.mark.needs_gcc
def test_c_terminal_is_a_shell_in_the_kernel_folder(harness):
    created = harness.ok("create_kernel", lang="c")
    harness.ok("upload_file", kernel_id=created["kernel_id"], name="main.c", data=HELLO_C)
    pty_exchange(harness, created, b"ls *.c && echo listed-$((6*7))\n", b"listed-42")


@pytest.mark.needs_gcc("g++")
def test_cpp_query(harness):
    kernel_id = harness.create("cpp")
    code = '#include <iostream>\nint main() { std::cout << "c++ " << 6 * 7 << std::endl; }\n'
    assert stdout_of(harness.query(kernel_id, code, timeout=60)) == "c++ 42\n"
