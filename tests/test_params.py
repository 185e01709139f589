"""Device parameters: one record per kind, unknown and misspelt keys refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.plugin import getPlugins

from xenmig.devices.devmodel.params import DevmodelParams
from xenmig.devices.disk.params import DiskParams
from xenmig.devices.file import FileParams
from xenmig.devices.vtpm.params import VTPMParams
from xenmig.errors import BadSpec
from xenmig.interfaces import IDeviceKind
from xenmig.model import DeviceDescription, DeviceSpec
from xenmig.params import DeviceParams, Where, flag, refuseUnknown
from xenmig.testing import FakeSourceContext, FakeTargetContext

#: A valid spec of each built-in kind, to add a wrong key to.
SPECS = {
    "file": "file:f:path=/a,target=b",
    "disk": "disk:d:path=/a.img,target=b.img",
    "vtpm": "vtpm:t:ctrl=/c,target-statedir=tpm",
    "devmodel": "devmodel:q:qmp=/s,target-statefile=q.state",
}
RECORDS: dict[str, type[DeviceParams]] = {
    "file": FileParams,
    "disk": DiskParams,
    "vtpm": VTPMParams,
    "devmodel": DevmodelParams,
}


def kinds() -> dict[str, IDeviceKind]:
    import twisted.plugins

    return {k.kind: k for k in getPlugins(IDeviceKind, twisted.plugins)}


def test_nearestKeyNamed() -> None:
    """An unknown key is named with the nearest known one, and the known ones."""
    with pytest.raises(BadSpec) as caught:
        refuseUnknown("disk device d", ["target-overwirte"], ["target-overwrite"])
    assert str(caught.value) == (
        "disk device d: unknown parameter(s) target-overwirte (did you mean "
        "target-overwrite?) (known: target-overwrite)"
    )


def test_farKeyNamedAlone() -> None:
    """A key like no known one is named without a guess."""
    with pytest.raises(BadSpec, match=r"unknown parameter\(s\) colour \(known"):
        refuseUnknown("file device f", ["colour"], ["path", "target"])


@pytest.mark.parametrize("kind", sorted(SPECS))
@pytest.mark.parametrize(
    "extra, named",
    [
        ("target-overwirte=yes", "target-overwirte (did you mean target-overwrite?)"),
        ("compres=yes", "compres"),
        ("allocated=0", "allocated"),  # a fact the source adds, not the user
    ],
)
def test_sourceRefusesUnknownKeys(kind: str, extra: str, named: str) -> None:
    """Every built-in kind's source refuses a key it does not know, naming it."""
    spec = DeviceSpec.parse(f"{SPECS[kind]},{extra}")
    with pytest.raises(BadSpec) as caught:
        kinds()[kind].source(spec, FakeSourceContext(reactor))
    message = str(caught.value)
    assert f"{kind} device {spec.name}: unknown parameter(s) {named}" in message
    assert "known: " in message


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_targetRefusesUnknownKeys(kind: str, tmp_path: Path) -> None:
    """Every built-in kind's target refuses a misspelt target key at Prepare."""
    spec = DeviceSpec.parse(SPECS[kind])
    facts: dict[str, Any] = {"max_size": 1 << 20} if kind == "devmodel" else {}
    params = {**spec.targetParams, **facts, "target-overwirte": "yes"}
    description = DeviceDescription(kind, spec.name, 100, params)
    context = FakeTargetContext(reactor, [str(tmp_path)])
    with pytest.raises(BadSpec) as caught:
        kinds()[kind].target(description, context)
    assert "unknown parameter(s) target-overwirte (did you mean " in str(caught.value)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_sourceKeysStayOnTheSource(kind: str, tmp_path: Path) -> None:
    """A target refuses a source key in a description (it never travels there)."""
    spec = DeviceSpec.parse(SPECS[kind])
    ownKey = next(iter(spec.params))
    facts: dict[str, Any] = {"max_size": 1 << 20} if kind == "devmodel" else {}
    params = {**spec.targetParams, **facts, ownKey: spec.params[ownKey]}
    description = DeviceDescription(kind, spec.name, 100, params)
    context = FakeTargetContext(reactor, [str(tmp_path)])
    with pytest.raises(BadSpec, match=f"unknown parameter.s. {ownKey}"):
        kinds()[kind].target(description, context)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_bothHalvesParseOneRecord(kind: str) -> None:
    """The source's record and the target's agree on every target key."""
    spec = DeviceSpec.parse(SPECS[kind])
    record = RECORDS[kind]
    facts: dict[str, Any] = {"max_size": 1 << 20} if kind == "devmodel" else {}
    description = DeviceDescription(kind, spec.name, 100, facts).withTargetParams(spec)
    source, target = record.fromSpec(spec), record.fromDescription(description)
    for key in spec.targetParams:
        field = next(
            f.name
            for f in dataclasses.fields(record)  # type: ignore[arg-type]
            if f.metadata["key"].name == key
        )
        assert getattr(source, field) == getattr(target, field)
    assert dataclasses.is_dataclass(source)
    with pytest.raises(dataclasses.FrozenInstanceError):
        source.KIND = "changed"  # type: ignore[misc]


def test_everyKeyIsDeclaredOnce() -> None:
    """Each record names each key once, and target keys travel to the target."""
    for record in RECORDS.values():
        names = [
            f.metadata["key"].name
            for f in dataclasses.fields(record)  # type: ignore[arg-type]
        ]
        assert len(names) == len(set(names))
        for name, key in record.keys().items():
            if name.startswith("target"):
                assert key.where == Where.BOTH, name


@pytest.mark.parametrize("value", ["maybe", "2", "yess"])
def test_flagsSayYesOrNo(value: str) -> None:
    """A yes/no parameter that is neither is refused, not taken as no."""
    with pytest.raises(BadSpec, match="is neither yes nor no"):
        flag("file device f", "target-overwrite", value)


def test_missingRequiredKeySaysHow() -> None:
    """A missing required key is asked for by its usage."""
    with pytest.raises(BadSpec, match="the disk kind needs target=DESTINATION"):
        DiskParams.fromSpec(DeviceSpec.parse("disk:d:path=/a.img"))
