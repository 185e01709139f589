"""Plug-in discovery and the interface contracts of every implementation and fake."""

import importlib
import sys

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.plugin import IPlugin, getPlugins
from zope.interface.verify import verifyObject

from xenmig.devices.file import FileKind, FileSource, FileTarget
from xenmig.interfaces import (
    IDeviceKind,
    IRecordWriter,
    ISourceContext,
    ISourceDevice,
    ITargetContext,
    ITargetDevice,
)
from xenmig.model import DeviceDescription, DeviceSpec
from xenmig.plugins import deviceKinds
from xenmig.testing import (
    FakeSourceContext,
    FakeTargetContext,
    MemoryKind,
    MemorySource,
    MemoryTarget,
    MemoryWriter,
    PipeWriter,
)

#: Every kind xenmig ships; each must be found through the plug-in system.
BUILT_IN = {"devmodel", "disk", "file", "vtpm"}


def test_twistdPluginFound():
    """``twistd xenmig`` is discovered as a service maker named xenmig."""
    import twisted.plugins

    makers = {m.tapname: m for m in getPlugins(IServiceMaker, twisted.plugins)}
    assert "xenmig" in makers
    options = makers["xenmig"].options()
    options.parseOptions(["--insecure-plaintext"])
    assert options["port"] == 8002
    assert options["interface"] == "127.0.0.1"


def test_builtInKindsFound():
    """Every built-in device kind is discovered by name and provides IDeviceKind."""
    kinds = deviceKinds()
    assert BUILT_IN <= set(kinds)
    for kind in kinds.values():
        assert verifyObject(IDeviceKind, kind)
        assert verifyObject(IPlugin, kind)


@pytest.mark.parametrize("kind", sorted(BUILT_IN))
def test_dropinImports(kind):
    """Each kind's dropin imports without error (a failing one vanishes silently)."""
    name = f"twisted.plugins.xenmig_{kind}"
    sys.modules.pop(name, None)
    module = importlib.import_module(name)
    assert getattr(module, f"{kind}Kind").kind == kind


def test_fileImplementations(tmp_path):
    """The file kind's two sides provide their interfaces."""
    (tmp_path / "src").write_bytes(b"x")
    spec = DeviceSpec.parse(f"file:f:path={tmp_path}/src,target=out")
    assert verifyObject(IDeviceKind, FileKind())
    assert verifyObject(ISourceDevice, FileSource(spec, FakeSourceContext(reactor)))
    context = FakeTargetContext(reactor, [str(tmp_path)])
    description = DeviceDescription("file", "f", 1, {"target": "out"})
    assert verifyObject(ITargetDevice, FileTarget(description, context))
    context.cleanup()


def test_fakes(tmp_path):
    """Every fake in xenmig.testing provides the interface it stands in for."""
    description = DeviceDescription("memory", "m", 4)
    target = MemoryTarget(description)
    assert verifyObject(ISourceContext, FakeSourceContext(reactor))
    context = FakeTargetContext(reactor, [str(tmp_path)])
    assert verifyObject(ITargetContext, context)
    context.cleanup()
    assert verifyObject(IRecordWriter, MemoryWriter())
    assert verifyObject(IRecordWriter, PipeWriter(target))
    assert verifyObject(ITargetDevice, target)
    assert verifyObject(ISourceDevice, MemorySource(DeviceSpec("memory", "m")))
    assert verifyObject(IDeviceKind, MemoryKind())


def test_realContexts(tmp_path):
    """The framework's own contexts and stream writer provide their interfaces."""
    from twisted.python.filepath import FilePath

    from xenmig.source.device import SourceContext
    from xenmig.source.streamsender import StreamSender
    from xenmig.target.config import TargetConfig
    from xenmig.target.context import TargetContext
    from xenmig.target.core import MigrationTarget

    target = MigrationTarget(
        reactor, TargetConfig(FilePath(str(tmp_path))), {}, lambda f, *a: f(*a)
    )
    assert verifyObject(ITargetContext, TargetContext(target, "m", "vm", "p", "d"))
    assert verifyObject(ISourceContext, SourceContext(None, reactor, "d"))
    assert verifyObject(IRecordWriter, StreamSender("d"))


IMPORTS_OF = """
import sys
{code}
print(" ".join(sorted(m for m in sys.modules if m.startswith("xenmig"))))
"""


def importedBy(code: str) -> set[str]:
    """The xenmig modules a fresh interpreter has imported after ``code``."""
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", IMPORTS_OF.format(code=code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(result.stdout.split())


def test_lazyKindsImportOnlyTheKindAskedFor() -> None:
    """Asking LazyKinds for the file kind imports no other kind's module."""
    imported = importedBy(
        "from xenmig.plugins import LazyKinds\n"
        "assert LazyKinds()['file'].kind == 'file'"
    )
    assert "xenmig.devices.file" in imported
    assert not {
        m
        for m in imported
        if m.startswith(
            ("xenmig.devices.disk", "xenmig.devices.vtpm", "xenmig.devices.devmodel")
        )
    }


def test_helpImportsNoDeviceKind() -> None:
    """``xenmig --help`` imports no device kind."""
    imported = importedBy(
        "from xenmig.cli.main import run\n"
        "try:\n    run(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert "xenmig.cli.main" in imported
    assert not {m for m in imported if m.startswith("xenmig.devices")}


def test_lazyKindsAreThePluginsKinds() -> None:
    """LazyKinds finds the same kinds as the plugin scan, and nothing more."""
    from xenmig.plugins import LazyKinds

    kinds = LazyKinds()
    scanned = deviceKinds()
    assert kinds["disk"] is scanned["disk"]
    assert kinds.get("no-such-kind") is None
    assert sorted(kinds) == sorted(scanned)
