"""A bounded fuzz of every API endpoint: random out-of-range and wrong-typed values (a fixed seed,
a fixed number of calls, each with a time limit) against a running `python app.py --demo`. The
server must survive every call, and every answer must be a result or an error with a message
that names the problem, never a Python internal."""

from __future__ import annotations

import random

import pytest

from tests.app_server import serving

CALLS = 90
HOSTILE = [None, -1, 0, 10**12, -(10**12), 1.5, "nan", "inf", "", "x" * 20_000, "../../../etc", "/etc/passwd",
           [], {}, True, {"a": 1}, [1, 2, 3], "1girl, solo", "n" * 300, "a\x00b"]
REQUIRED = {"/caption": ["dataset"], "/train": ["dataset"], "/generate": ["prompt"],
            "/grid": ["x_axis", "x_values", "y_axis", "y_values", "prompt"]}
INTERNAL = ("object has no attribute", "Traceback", "unsupported operand", "is not subscriptable",
            "cannot convert float NaN", "object is not iterable", "takes from", "[Errno", "embedded null")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("fuzz")) as server:
        yield server


def test_random_hostile_values_never_break_the_server(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server.url, verbose=False, analytics_enabled=False)
    api = {name: info["parameters"] for name, info in
           client.view_api(return_format="dict", print_info=False)["named_endpoints"].items()
           if name != "/png_info"}  # a file input: the client itself refuses non-files
    endpoints = {name: [p["parameter_name"] for p in params] for name, params in api.items()}
    required = {name: [p["parameter_name"] for p in params if not p.get("parameter_has_default", True)]
                for name, params in api.items()}  # the client refuses a call without them
    rng = random.Random(20261204)
    unclear = []
    for _ in range(CALLS):
        name = rng.choice(sorted(endpoints))
        params = endpoints[name]
        chosen = set(REQUIRED.get(name, [])) | set(required[name]) | set(rng.sample(params, min(len(params),
                                                                                        rng.randint(1, 3))))
        kwargs = {p: rng.choice(HOSTILE) for p in sorted(chosen)}
        try:
            client.submit(api_name=name, **kwargs).result(timeout=120)
        except AppError as error:
            message = str(error)
            if not message.strip() or any(marker in message for marker in INTERNAL):
                unclear.append((name, kwargs, message[:200]))
        assert server.process.poll() is None, f"the server died on {name} {kwargs}:\n{server.output()[-3000:]}"
    assert client.predict(api_name="/train_status"), "the server still answers"
    assert not unclear, unclear


@pytest.mark.parametrize("endpoint, kwargs, message", [
    ("/generate", {"prompt": "1girl", "width": 100000}, "width: Input should be less than or equal to 4096"),
    ("/generate", {"prompt": "1girl", "steps": "abc"}, "steps: expected a number, got 'abc'"),
    ("/generate", {"prompt": "1girl", "sampler": "bogus"}, "sampler: Value: bogus is not in the list of choices"),
    ("/caption", {"dataset": "x", "general_threshold": 5}, "general_threshold: Value 5 is greater than maximum"),
    ("/grid", {"x_axis": "bogus", "x_values": "1", "y_axis": "", "y_values": "", "prompt": "a"},
     "x_axis: Value: bogus is not in the list of choices"),
    ("/train", {"dataset": "d" * 300}, "is too long for a path: at most 255 bytes a name"),
    ("/caption", {"dataset": "a\x00b"}, "contains a NUL character"),
])
def test_values_gradio_refuses_itself_name_the_field(server, endpoint, kwargs, message):
    """Gradio checks slider ranges and dropdown choices before a handler runs; its refusal names
    the API field (Gradio alone says "component at index 6")."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server.url, verbose=False, analytics_enabled=False)
    with pytest.raises(AppError) as error:
        client.predict(api_name=endpoint, **kwargs)
    assert message in str(error.value)
