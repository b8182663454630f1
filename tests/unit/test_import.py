import subprocess
import sys


def test_import_prefect_vllm_imports_neither_vllm_torch_nor_ray() -> None:
    """Prefect imports every collection at start-up: ours must stay light."""
    code = (
        "import sys, prefect_vllm, prefect_vllm.flows, prefect_vllm.tasks, prefect_vllm.cli; "
        "print(','.join(m for m in ('vllm', 'torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_collection_entry_point_names_the_package() -> None:
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="prefect.collections")}
    assert names.get("prefect_vllm") == "prefect_vllm"
