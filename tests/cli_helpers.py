"""What every CLI test checks about a user error: exactly one line, ``ddpm-fast: error: ...``, no traceback."""


def error_line(capsys) -> str:
    """The single stderr line of a failed ``main([...])`` call (asserting there is exactly one)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm-fast: error: "), err
    return lines[0]
