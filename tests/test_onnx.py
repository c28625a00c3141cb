"""ONNX stage graphs: every stage in onnxruntime equals the torch runner, MACs per stage, the
torch-free runner (in a subprocess where importing torch fails), refusal of mismatched or
modified export directories, bad inputs, the dense-subnet export and ``export --onnx``.

Models are tiny (32x32 inputs, random weights, BN statistics and biases); stage outputs are
compared with a tolerance of 1e-4 relative to the largest logit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx", reason="onnx is missing: pip install -e '.[onnx]' (the test extra includes it)")
pytest.importorskip(
    "onnxruntime", reason="onnxruntime is missing: pip install -e '.[onnx]' (the test extra includes it)"
)

from nni_steppingnet import SteppingNet  # noqa: E402
from nni_steppingnet.cli import main  # noqa: E402
from nni_steppingnet.onnx_export import export_onnx, export_subnet_onnx  # noqa: E402
from nni_steppingnet.onnx_runner import MANIFEST_NAME, ManifestError, OnnxStepRunner, manifest_sha256  # noqa: E402
from nni_steppingnet.runtime import IncrementalRunner  # noqa: E402

N = 3
IMG = 32
RTOL = 1e-4

#: The foundation's model list (as in tests/test_runtime.py): paper models and one timm CNN per family.
MODELS: list[tuple[str, dict[str, Any]]] = [
    ("lenet3c1l", {}),
    ("lenet5", {}),
    ("vgg16_cifar", {"width": 0.5}),
    ("resnet18", {}),
    ("mobilenetv3_small_100", {}),
    ("efficientnet_b0", {}),
    ("regnetx_002", {}),
    ("densenet121", {}),
]
#: Exports of more than ~15 s on one core (many grouped-conv buckets or layers).
SLOW = {"regnetx_002", "densenet121"}

Exported = tuple[SteppingNet, IncrementalRunner, Path]


def _inputs(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _randomize_biases(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)


def _stress(net: SteppingNet, random_assignment: Callable[..., torch.Tensor], seed: int) -> None:
    """Random nested assignment, then one group entirely in subnet 2: its layers get no channel
    at stages 1 and 3, so those stage graphs carry tensors with zero channels."""
    random_assignment(net, seed=seed)
    middle = len(net.groups) // 2
    net.groups[middle].assignment = torch.full((net.groups[middle].size,), 2)


def _close(got: np.ndarray, ref: torch.Tensor, what: str) -> None:
    expected = ref.detach().cpu().numpy()
    scale = float(np.abs(expected).max())
    assert scale > 0, f"{what}: reference logits are all zero; the check would be vacuous"
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    err = float(np.abs(got - expected).max())
    assert err <= RTOL * scale, f"{what}: max abs error {err:.3e} > {RTOL} x max logit {scale:.3e}"


def _torch_stages(runner: IncrementalRunner, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [runner.start(x)] + [runner.step() for _ in range(2, runner.num_subnets + 1)]


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Callable[..., nn.Module],
    random_assignment: Callable[..., torch.Tensor],
    randomize_bn: Callable[..., nn.Module],
) -> Callable[[str], Exported]:
    """``exported(name)``: a cached (net, torch runner, export directory) with the stress assignment."""
    cache: dict[str, Exported] = {}
    kwargs = dict(MODELS)
    root = tmp_path_factory.mktemp("onnx")

    def get(name: str) -> Exported:
        if name not in cache:
            model = randomize_bn(tiny_model(name, seed=0, **kwargs[name]), seed=1)
            _randomize_biases(model, seed=2)
            net = SteppingNet(model, _inputs(1, seed=3), N, verify=False)
            _stress(net, random_assignment, seed=4)
            runner = IncrementalRunner(net)
            directory = root / name
            export_onnx(runner, directory, check=False)
            cache[name] = (net, runner, directory)
        return cache[name]

    return get


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name, _ in MODELS]
)
def test_every_stage_in_onnxruntime_equals_the_torch_runner(exported: Callable[[str], Exported], name: str) -> None:
    net, runner, directory = exported(name)
    assert runner.layout == "delta"
    flat = net.flat_assignment()
    hidden = [net.layer_assignment(k, flat)[0] for k, layer in enumerate(net.layers) if not layer.is_logits]
    assert any(int((a == 1).sum()) == 0 < int((a <= N).sum()) for a in hidden), (
        "no layer without a channel in subnet 1: the zero-channel path would go untested"
    )
    onnx_runner = OnnxStepRunner(directory, threads=1, expect_hash=runner.assignment_hash())
    manifest = onnx_runner.manifest
    # MACs per stage: exactly what the step adds to the masked subnet.
    assert [stage["macs"] for stage in manifest["stages"]] == [
        net.macs(s) - (net.macs(s - 1) if s > 1 else 0) for s in range(1, N + 1)
    ]
    assert [stage["macs_cumulative"] for stage in manifest["stages"]] == [net.macs(s) for s in range(1, N + 1)]
    for batch in (1, 8):
        x = _inputs(batch, seed=10 + batch)
        refs = _torch_stages(runner, x)
        for s in range(1, N + 1):
            got = onnx_runner.start(x.numpy()) if s == 1 else onnx_runner.step()
            _close(got, refs[s - 1], f"{name} batch {batch} stage {s}")
            assert onnx_runner.stage == s
            assert onnx_runner.macs_spent == net.macs(s)
            assert onnx_runner.macs_spent_total == net.macs(s) * batch


def _transformer(name: str) -> nn.Module:
    """Small timm transformers and LayerNorm models at 32x32 (nested norms, attention heads,
    token mixing, patch merging), every parameter random."""
    import timm

    from nni_steppingnet.testing import randomize_parameters

    torch.manual_seed(0)
    if name == "vit":
        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=8, depth=2, embed_dim=48, num_heads=3
        )
    elif name == "convnext":
        model = timm.create_model("convnext_atto", pretrained=False, dims=(16, 24, 32, 40), depths=(1, 1, 1, 1))
    elif name == "swin":
        model = timm.create_model(
            "swin_tiny_patch4_window7_224",
            pretrained=False,
            img_size=IMG,
            embed_dim=24,
            depths=(2, 2),
            num_heads=(2, 4),
            window_size=4,
        )
    elif name == "tiny_vit":  # interleaved [q k v] heads, a pre-norm inside the attention
        model = timm.create_model(
            "tiny_vit_5m_224",
            pretrained=False,
            embed_dims=(16, 32, 48, 64),
            depths=(1, 1, 1, 1),
            num_heads=(1, 2, 3, 4),
        )
    else:
        model = timm.models.mlp_mixer.MlpMixer(img_size=IMG, patch_size=8, num_blocks=2, embed_dim=32)
    model.reset_classifier(10)
    return randomize_parameters(model.eval(), seed=1)


@pytest.mark.parametrize("name", ["vit", "convnext", "swin", "tiny_vit", "mixer"])
def test_transformer_stage_graphs_extend_norms_and_heads(
    tmp_path: Path, random_assignment: Callable[..., torch.Tensor], name: str
) -> None:
    """Nested norms keep the statistics of their earlier stages' channels as stage state (those of the new
    channels span all of them), attention computes the new heads only, token mixing the new
    channels: every stage graph in onnxruntime equals the torch runner, at the stage's MACs."""
    net = SteppingNet(_transformer(name), _inputs(1, seed=3), N)
    random_assignment(net, seed=5)
    runner = IncrementalRunner(net)
    assert runner.layout == "delta"
    directory = tmp_path / name
    export_onnx(runner, directory, check=False)
    onnx_runner = OnnxStepRunner(directory, threads=1, expect_hash=runner.assignment_hash())
    norms = {f"{norm}:0" for norm in net.nested_norms.positions}
    _torch_stages(runner, _inputs(2, seed=6))
    written = runner.stage_io(1)[1]
    assert norms & set(written), "stage 1 keeps no nested norm's inputs for the later stages"
    assert len(onnx_runner.manifest["stages"][0]["outputs"]) == 1 + len(written)
    for batch in (1, 4):
        x = _inputs(batch, seed=30 + batch)
        refs = _torch_stages(runner, x)
        for s in range(1, N + 1):
            got = onnx_runner.start(x.numpy()) if s == 1 else onnx_runner.step()
            with torch.no_grad(), net.subnet(s):
                masked = net.model(x)
            _close(got, refs[s - 1], f"{name} batch {batch} stage {s}")
            _close(got, masked, f"{name} batch {batch} stage {s} (masked subnet)")
            assert onnx_runner.macs_spent == net.macs(s)


@pytest.mark.parametrize("seed", [21, 22])
def test_random_nested_assignments_of_other_sizes(
    tmp_path: Path, tiny_model: Callable[..., nn.Module], random_assignment: Callable[..., torch.Tensor], seed: int
) -> None:
    """Other numbers of subnets and plain random assignments (neurons left unused included)."""
    num, name, kwargs = (2, "resnet18", {}) if seed == 21 else (5, "vgg16_cifar", {"width": 0.25})
    net = SteppingNet(tiny_model(name, seed=seed, **kwargs), _inputs(1, seed=3), num, verify=False)
    random_assignment(net, seed=seed)
    runner = IncrementalRunner(net)
    runner.export_onnx(tmp_path / "stages")  # also checks itself at batch 3
    onnx_runner = OnnxStepRunner(tmp_path / "stages", threads=1)
    x = _inputs(8, seed=seed)
    refs = _torch_stages(runner, x)
    assert len(onnx_runner.manifest["stages"]) == num
    for s in range(1, num + 1):
        _close(onnx_runner.start(x.numpy()) if s == 1 else onnx_runner.step(), refs[s - 1], f"stage {s}")
        assert onnx_runner.macs_spent == net.macs(s)


def test_fused_graphs_reach_a_subnet_in_one_call_and_stepping_continues(
    tmp_path: Path, tiny_model: Callable[..., nn.Module], random_assignment: Callable[..., torch.Tensor]
) -> None:
    net = SteppingNet(tiny_model("resnet18", seed=1), _inputs(1, seed=3), N, verify=False)
    _stress(net, random_assignment, seed=5)
    runner = IncrementalRunner(net)
    export_onnx(runner, tmp_path / "fused", fused=True, check=False)
    onnx_runner = OnnxStepRunner(tmp_path / "fused", threads=1)
    assert [entry["file"] for entry in onnx_runner.manifest["reach"]] == [f"reach{s}.onnx" for s in range(2, N + 1)]
    x = _inputs(8, seed=12)
    refs = _torch_stages(runner, x)
    for s in range(2, N + 1):
        _close(onnx_runner.run(x.numpy(), until=s), refs[s - 1], f"fused 1..{s}")
        assert onnx_runner.stage == s and onnx_runner.macs_spent == net.macs(s)
        for t in range(s + 1, N + 1):  # stepping goes on from the fused graph's state
            _close(onnx_runner.step(), refs[t - 1], f"fused 1..{s}, then step to {t}")
    _close(onnx_runner.run(x.numpy(), max_macs=net.macs(2)), refs[1], "max_macs through reach2")
    assert onnx_runner.stage == 2
    # Without the fused graphs the same calls step.
    plain = OnnxStepRunner(tmp_path / "fused", threads=1, fused=False)
    _close(plain.run(x.numpy(), until=N), refs[-1], "stepping")
    # A fused graph is hashed like the stage graphs.
    (tmp_path / "fused" / "reach2.onnx").write_bytes(b"not a graph")
    with pytest.raises(ManifestError, match="reach2.onnx is not the graph"):
        OnnxStepRunner(tmp_path / "fused")


def test_traced_stage_graphs_in_torch_equal_the_runner(exported: Callable[[str], Exported]) -> None:
    from nni_steppingnet.onnx_export import TracedStepRunner

    name = "resnet18"
    net, runner, _ = exported(name)
    traced = TracedStepRunner(runner)
    for batch in (1, 8):
        x = _inputs(batch, seed=40 + batch)
        refs = _torch_stages(runner, x)
        for s in range(1, N + 1):
            got = traced.start(x) if s == 1 else traced.step()
            _close(got.numpy(), refs[s - 1], f"traced {name} batch {batch} stage {s}")
            assert traced.stage == s and traced.macs_spent == net.macs(s)
    with pytest.raises(RuntimeError, match="last subnet"):
        traced.step()
    with pytest.raises(ValueError, match=r"\[batch, 3, 32, 32\]"):
        traced.start(_inputs(1, seed=1)[:, :, :16])
    with pytest.raises(ValueError, match="CUDA device"):
        TracedStepRunner(runner, cuda_graphs=True, batch_size=1)


def test_manifest_describes_the_graphs(exported: Callable[[str], Exported]) -> None:
    net, runner, directory = exported("lenet5")
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    assert manifest["num_subnets"] == N and manifest["opset"] == 17
    assert manifest["input"] == {"name": "input", "shape": [None, 3, IMG, IMG], "dtype": "float32"}
    assert manifest["output"]["shape"] == [None, 10]
    assert manifest["assignment_hash"] == runner.assignment_hash()
    assert [stage["file"] for stage in manifest["stages"]] == [f"stage{s}.onnx" for s in range(1, N + 1)]
    states = {item["name"] for item in manifest["state"]}
    for s, stage in enumerate(manifest["stages"], start=1):
        inputs = {spec["name"] for spec in stage["inputs"]}
        assert inputs <= {"input"} | states
        assert (s == 1) == ("input" in inputs and inputs == {"input"})
        assert stage["outputs"][0]["name"] == "logits"
        written = [spec["state"] for spec in stage["outputs"][1:]]
        assert set(written) <= states
        # The last stage writes nothing: no later stage reads it.
        assert (s == N) == (not written)
        for spec in stage["inputs"] + stage["outputs"]:
            assert spec["shape"][0] is None and spec["dtype"] == "float32"


def test_another_assignment_gives_another_hash(
    tiny_model: Callable[..., nn.Module], random_assignment: Callable[..., torch.Tensor]
) -> None:
    net = SteppingNet(tiny_model("lenet5"), _inputs(1, seed=3), N, verify=False)
    random_assignment(net, seed=1)
    first = IncrementalRunner(net).assignment_hash()
    assert IncrementalRunner(net).assignment_hash() == first
    random_assignment(net, seed=2)
    assert IncrementalRunner(net).assignment_hash() != first


# ------------------------------------------------------------------------------ budgets and errors
def test_budgets_and_call_order(exported: Callable[[str], Exported]) -> None:
    net, runner, directory = exported("lenet5")
    onnx_runner = OnnxStepRunner(directory, threads=1)
    x = _inputs(2, seed=5).numpy()
    with pytest.raises(RuntimeError, match="before start"):
        onnx_runner.step()
    onnx_runner.run(x, until=2)
    assert onnx_runner.stage == 2
    onnx_runner.run(x, max_macs=net.macs(2))
    assert onnx_runner.stage == 2 and onnx_runner.macs_spent == net.macs(2)
    with pytest.raises(ValueError, match="below subnet 1"):
        onnx_runner.run(x, max_macs=net.macs(1) - 1)
    onnx_runner.run(x, deadline_s=1e-9)
    assert onnx_runner.stage == 1  # subnet 1 always runs
    onnx_runner.run(x, deadline_s=60.0)
    assert onnx_runner.stage == N
    with pytest.raises(RuntimeError, match="last subnet"):
        onnx_runner.step()
    with pytest.raises(ValueError, match="at most one"):
        onnx_runner.run(x, until=1, max_macs=10**9)


def test_bad_inputs_are_refused(exported: Callable[[str], Exported]) -> None:
    _, _, directory = exported("lenet5")
    onnx_runner = OnnxStepRunner(directory, threads=1)
    with pytest.raises(TypeError, match="astype"):
        onnx_runner.start(np.zeros((1, 3, IMG, IMG), dtype=np.float64))
    with pytest.raises(ValueError, match=r"\[batch, 3, 32, 32\]"):
        onnx_runner.start(np.zeros((1, 3, 16, 16), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        onnx_runner.start(np.zeros((3, IMG, IMG), dtype=np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        onnx_runner.start(torch.zeros(1, 3, IMG, IMG))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="optimization"):
        OnnxStepRunner(directory, optimization="fast")
    with pytest.raises(ValueError, match="no input normalisation"):
        onnx_runner.preprocess(np.zeros((1, IMG, IMG, 3), dtype=np.uint8))


def _copy(directory: Path, target: Path) -> Path:
    shutil.copytree(directory, target)
    return target


def _rewrite(directory: Path, change: Callable[[dict[str, Any]], None], rehash: bool) -> None:
    path = directory / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    if rehash:
        manifest["manifest_sha256"] = manifest_sha256(manifest)
    path.write_text(json.dumps(manifest))


def test_modified_or_mixed_directories_are_refused(exported: Callable[[str], Exported], tmp_path: Path) -> None:
    net, runner, directory = exported("lenet5")
    _, other_runner, other = exported("lenet3c1l")
    # A manifest edited by hand (MACs of stage 2) without its hash.
    edited = _copy(directory, tmp_path / "edited")
    _rewrite(edited, lambda m: m["stages"][1].update(macs=1), rehash=False)
    with pytest.raises(ManifestError, match="modified after export"):
        OnnxStepRunner(edited)
    # A graph of another model's export copied in.
    mixed = _copy(directory, tmp_path / "mixed")
    shutil.copy(other / "stage2.onnx", mixed / "stage2.onnx")
    with pytest.raises(ManifestError, match="mixes files of different exports"):
        OnnxStepRunner(mixed)
    # The same, with every hash recomputed: the graph's inputs and outputs do not fit the manifest.
    from nni_steppingnet.onnx_runner import file_sha256

    _rewrite(mixed, lambda m: m["stages"][1].update(sha256=file_sha256(mixed / "stage2.onnx")), rehash=True)
    with pytest.raises(ManifestError, match="does not belong to this manifest"):
        OnnxStepRunner(mixed)
    # The whole directory of another model, where this model's export is expected.
    with pytest.raises(ManifestError, match="another model or assignment"):
        OnnxStepRunner(other, expect_hash=runner.assignment_hash())
    OnnxStepRunner(other, expect_hash=other_runner.assignment_hash())
    # Missing pieces.
    missing = _copy(directory, tmp_path / "missing")
    (missing / "stage3.onnx").unlink()
    with pytest.raises(ManifestError, match="lacks stage3.onnx"):
        OnnxStepRunner(missing)
    with pytest.raises(ManifestError, match="no manifest.json"):
        OnnxStepRunner(tmp_path)
    with pytest.raises(ManifestError, match="not a directory"):
        OnnxStepRunner(tmp_path / "nowhere")


def test_export_refuses_other_layouts_and_foreign_folders(
    exported: Callable[[str], Exported],
    tmp_path: Path,
    tiny_model: Callable[..., nn.Module],
    random_assignment: Callable[..., torch.Tensor],
) -> None:
    net = SteppingNet(tiny_model("lenet5"), _inputs(1, seed=3), N, verify=False)
    random_assignment(net, seed=1)
    with pytest.raises(ValueError, match="delta layout.*because of layout='full' was requested.*export_subnet_onnx"):
        export_onnx(IncrementalRunner(net, layout="full"), tmp_path / "full", check=False)
    assert IncrementalRunner(net).full_layout_reason == ""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        export_onnx(IncrementalRunner(net), foreign, check=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="normalization"):
        export_onnx(IncrementalRunner(net), tmp_path / "norm", normalization={"mean": [0.5, 0.5]}, check=False)
    # An earlier export is replaced.
    target = tmp_path / "again"
    export_onnx(
        IncrementalRunner(net), target, check=False, normalization={"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}
    )
    random_assignment(net, seed=2)
    runner = IncrementalRunner(net)
    export_onnx(runner, target)
    assert OnnxStepRunner(target).assignment_hash == runner.assignment_hash()


# ------------------------------------------------------------------------------ without torch
_NO_TORCH = """
import sys
sys.modules["torch"] = None          # `import torch` raises ImportError from here on
import numpy as np
"""


def _run_without_torch(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_NO_TORCH) + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_onnx_runner_works_where_torch_cannot_be_imported(exported: Callable[[str], Exported], tmp_path: Path) -> None:
    net, runner, directory = exported("resnet18")
    x = _inputs(4, seed=7)
    refs = _torch_stages(runner, x)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "refs.npy", torch.stack(refs).numpy())
    result = _run_without_torch(
        f"""
        from nni_steppingnet.onnx_runner import OnnxStepRunner
        x = np.load("x.npy")
        refs = np.load("refs.npy")
        runner = OnnxStepRunner({str(directory)!r}, threads=1)
        errors = []
        for s in range(1, {N} + 1):
            got = runner.start(x) if s == 1 else runner.step()
            errors.append(float(np.abs(got - refs[s - 1]).max() / np.abs(refs[s - 1]).max()))
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.") or m.startswith("torch_"))
        print("errors", max(errors), "macs", runner.macs_spent, "torch modules", loaded, sys.modules["torch"])
    """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    words = result.stdout.split()
    assert float(words[1]) <= RTOL, result.stdout
    assert int(words[3]) == net.macs(N)
    assert "torch modules ['torch'] None" in result.stdout, result.stdout


def test_command_line_runner_prints_every_stage(exported: Callable[[str], Exported], tmp_path: Path) -> None:
    net, runner, directory = exported("lenet5")
    x = _inputs(3, seed=8)
    refs = _torch_stages(runner, x)
    np.save(tmp_path / "images.npy", x.numpy())
    result = _run_without_torch(
        f"""
        import runpy
        sys.argv = ["onnx_runner", {str(directory)!r}, "images.npy", "--threads", "1"]
        runpy.run_module("nni_steppingnet.onnx_runner", run_name="__main__")
    """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == N, result.stdout
    for s, row in enumerate(rows, start=1):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert int(cells[0]) == s
        assert int(cells[3].replace(",", "")) == net.macs(s) - (net.macs(s - 1) if s > 1 else 0)
        assert int(cells[4].replace(",", "")) == net.macs(s)
        assert cells[5].split() == [str(int(p)) for p in refs[s - 1].argmax(dim=-1)]
    bad = _run_without_torch(
        f"""
        import runpy
        np.save("wrong.npy", np.zeros((2, 3, 8, 8), dtype=np.float32))
        sys.argv = ["onnx_runner", {str(directory)!r}, "wrong.npy"]
        runpy.run_module("nni_steppingnet.onnx_runner", run_name="__main__")
    """,
        tmp_path,
    )
    assert bad.returncode != 0 and "error:" in bad.stderr and "[batch, 3, 32, 32]" in bad.stderr, bad.stderr[-2000:]


# ------------------------------------------------------------------------------ dense subnet and the CLI
def test_dense_subnet_export_has_a_dynamic_batch(exported: Callable[[str], Exported], tmp_path: Path) -> None:
    import onnxruntime as ort

    net, _, _ = exported("resnet18")
    module = net.export_subnet(2).eval()
    path = export_subnet_onnx(module, tmp_path / "subnet2.onnx", _inputs(1, seed=3))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    net.model.eval()
    for batch in (1, 8):
        x = _inputs(batch, seed=30 + batch)
        with torch.no_grad(), net.subnet(2):
            expected = net.model(x)
        _close(session.run(None, {"input": x.numpy()})[0], expected, f"dense subnet 2, batch {batch}")
    with pytest.raises(ValueError, match=r"\.onnx"):
        export_subnet_onnx(module, tmp_path / "subnet2.pt", _inputs(1, seed=3))


#: A run small enough for a test (as tests/test_flow.py): 64 synthetic 16x16 images, LeNet-3C1L/4.
TINY = [
    "data.name=synthetic",
    "data.synthetic_size=64",
    "data.batch_size=16",
    "model.width=0.25",
    "steppingnet.expansion=1.5",
    "teacher.epochs=1",
    "construction.iterations=4",
    "construction.batches_per_iteration=2",
    "construction.monitor_samples=16",
    "retraining.epochs=1",
]


def test_export_command_writes_stage_graphs_of_a_constructed_net(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nni_steppingnet.flow import load_checkpoint

    run = tmp_path / "run"
    sets = [arg for item in TINY for arg in ("--set", item)]
    assert main(["run", "quickstart", "--out", str(run), "--device", "cpu", "--no-progress", *sets]) == 0
    capsys.readouterr()
    stages = tmp_path / "stages"
    assert main(["export", str(run), "--onnx", str(stages), "--mean", "0.5", "--std", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "checked against the torch runner" in printed and "onnx_runner" in printed
    loaded = load_checkpoint(run)
    net = loaded.net
    net.model.eval()
    onnx_runner = OnnxStepRunner(stages, threads=1, expect_hash=IncrementalRunner(net).assignment_hash())
    assert onnx_runner.manifest["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert onnx_runner.manifest["model"] == loaded.recipe.model.name
    x = torch.randn(5, *net.example_inputs.shape[1:], generator=torch.Generator().manual_seed(9))
    for s in range(1, net.num_subnets + 1):
        with torch.no_grad(), net.subnet(s):
            expected = net.model(x)
        _close(onnx_runner.start(x.numpy()) if s == 1 else onnx_runner.step(), expected, f"constructed subnet {s}")
        assert onnx_runner.macs_spent == net.macs(s)
    raw = np.full((2, 16, 16, 3), 255, dtype=np.uint8)
    assert np.allclose(onnx_runner.preprocess(raw), (1.0 - 0.5) / 0.25)
    # One dense subnet as one graph.
    assert main(["export", str(run), "--subnet", "2", "--onnx", str(tmp_path / "sub2.onnx")]) == 0
    assert (tmp_path / "sub2.onnx").is_file()
    # Errors: a folder name with --subnet is fine, a .onnx file name without it is not; --out with --onnx.
    assert main(["export", str(run), "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert "writes a folder of stage graphs" in capsys.readouterr().err
    assert main(["export", str(run), "--onnx", str(stages), "--out", str(tmp_path / "r.pt")]) == 2
    assert "--out names the .pt file" in capsys.readouterr().err
    assert main(["export", str(run), "--onnx", str(run)]) == 2  # the run folder holds other files
    assert main(["export", str(run)]) == 2
    assert "one of --subnet s, --runner or --onnx" in capsys.readouterr().err
