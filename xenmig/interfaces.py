"""The contracts: device kinds, their two sides, contexts, the target core's face."""

from __future__ import annotations

from zope.interface import Attribute, Interface

# Methods are written without ``self``, as zope.interface wants.  Every method that does
# work returns a Deferred; cancelling it stops the work and leaves things as they were.


class IDeviceKind(Interface):
    """
    A kind of device state (``file``, ``vtpm``, ``disk``, ``devmodel``, ...).

    Provided by plug-ins: a dropin module under ``twisted/plugins/`` holds an object
    that provides both ``IPlugin`` and ``IDeviceKind``; xenmig finds it by ``kind``.
    """

    kind = Attribute("str: the name used in device specs, e.g. 'file'.")
    summary = Attribute("str: one line describing what this kind migrates.")

    def source(spec, context):
        """
        Build the source side of a device.

        @param spec: the L{xenmig.model.DeviceSpec} the toolstack gave.
        @param context: an L{ISourceContext}.
        @return: an L{ISourceDevice}.
        @raise xenmig.errors.BadSpec: if the parameters are wrong for this kind.
        """

    def target(description, context):
        """
        Build the target side of a device.

        @param description: the L{xenmig.model.DeviceDescription} the source sent.
        @param context: an L{ITargetContext}.
        @return: an L{ITargetDevice}.
        @raise xenmig.errors.BadSpec: if the parameters are wrong for this kind.
        """


class IRecordWriter(Interface):
    """
    Where a source device writes its state: one stream, framed as records.

    Each write returns a Deferred that fires when the writer can take more
    (backpressure): a device awaits it before producing the next chunk, so memory
    stays bounded whatever the size of the state.
    """

    bytesWritten = Attribute("int: logical bytes (data and zero ranges) written.")

    def writeData(offset, data):
        """Write ``data`` (bytes) at ``offset``; a Deferred firing with None."""

    def writeZero(offset, length):
        """Declare ``length`` zero bytes at ``offset``; a Deferred firing with None."""

    def writeMetadata(metadata):
        """Write a small JSON-able dict; a Deferred firing with None."""


class ISourceDevice(Interface):
    """
    The source side of one device: takes state out of a live component.

    Order: C{describe} (VM running) -> C{accepted} -> zero or more C{sendRound}
    (VM running, if C{precopy}) -> C{sendFinal} (VM paused) -> C{release} after a
    commit, or C{rollback} after an abort at any point.
    """

    spec = Attribute("The L{xenmig.model.DeviceSpec} this device was built from.")
    precopy = Attribute("bool: whether this device sends rounds while the VM runs.")

    def describe():
        """
        Check the source component and describe the device, before the VM pauses.
        The framework adds the spec's target parameters to the description's.

        @return: a Deferred firing with a L{xenmig.model.DeviceDescription}; failing
            with L{xenmig.errors.DeviceError} if the component is not usable.
        """

    def accepted(params):
        """
        Learn that the target accepted the device, with the target's parameters.
        @param params: the dict the target handler's C{accept} fired with.
        @return: None.
        """

    def sendRound(writer, round):
        """
        Send one pre-copy round while the VM still runs (only if C{precopy}).

        @param writer: an L{IRecordWriter}.
        @param round: the round number, from 0.
        @return: a Deferred firing with a L{xenmig.model.RoundResult}.
        """

    def sendFinal(writer):
        """
        Send the final state; the VM is paused and stays paused until commit or abort.

        @return: a Deferred firing with the L{xenmig.model.ContentDigest} of the whole
            logical content, which the framework sends in the END record.
        """

    def rollback():
        """
        Undo anything taken out: the source component is as it was before Prepare.

        Called after an abort, at any point.  Must not fail for a device that never
        started.  @return: a Deferred firing with None.
        """

    def release():
        """
        Let go of the source component after the target committed (stop the swtpm,
        hand the VM back to the toolstack for destruction).  @return: a Deferred
        firing with None.
        """


class ITargetDevice(Interface):
    """
    The target side of one device: puts state back into a component.

    Order: C{accept} -> C{receive} for each record -> C{finish} -> C{commit}, or
    C{abort} at any point before C{commit} completes.
    """

    description = Attribute("The L{xenmig.model.DeviceDescription} from the source.")
    requestMethods = Attribute(
        "frozenset of str: the handler-scoped methods C{handleRequest} answers."
    )

    def accept():
        """
        Check that this host can take the device (space, keys, destination allowed).

        @return: a Deferred firing with a dict of parameters for the source handler;
            failing with L{xenmig.errors.DeviceRefused} (or L{PathNotAllowed}) if not.
        """

    def receive(record):
        """
        Take one record of the stream (DATA, ZERO, METADATA or ROUND).

        @return: None if the device can take the next record now, or a Deferred that
            fires when it can (the stream pauses meanwhile).
        @raise xenmig.errors.StreamError: if the record is not acceptable.
        """

    def finish(end):
        """
        All records arrived: flush, verify and stage the state.

        @param end: the L{xenmig.records.EndRecord} from the source.
        @return: a Deferred firing with the L{xenmig.model.ContentDigest} of what was
            staged, computed on this side; failing with L{xenmig.errors.StreamError}.
        """

    def commit():
        """
        Install the staged state: atomic rename, load into the component.
        @return: a Deferred firing with a list of str naming what was installed.
        """

    def abort():
        """
        Discard everything staged; nothing may remain at the destination.

        Called at any point before commit completes, possibly while a C{receive} or
        C{finish} Deferred is outstanding.  @return: a Deferred firing with None.
        """

    def handleRequest(method, payload):
        """
        Answer a handler-scoped request from the peer source device.

        @param method: one of C{requestMethods}.
        @param payload: a small JSON-able dict.
        @return: a Deferred firing with a small JSON-able dict.
        """


class IInstallingDevice(Interface):
    """
    A target device that says, before its C{commit}, where that commit puts
    its state on disk (optional, beside L{ITargetDevice}).  The framework
    journals it before the install, so that a commit that fails, or that a
    crash interrupts, can be reversed: what the install left at that
    destination is removed.  A device that does not provide it installs
    nothing the framework can take back (its state loaded into a component
    is simply never released).
    """

    destination = Attribute(
        "A L{twisted.python.filepath.FilePath} (from "
        "C{ITargetContext.resolveDestination}) of the file or directory that "
        "C{commit} creates or replaces, by a rename; or None when C{commit} "
        "puts nothing on disk (it loads the state into a running component)."
    )


class IStagelessDevice(Interface):
    """
    A target device that stages nothing (optional, beside L{ITargetDevice}): it
    puts the state straight into a running component.  The framework then makes
    no C{stagingDir} for it, which saves its Prepare a thread hand-off and two
    directories.  Provided by an instance (C{zope.interface.alsoProvides}) where
    it depends on the device's parameters.
    """


class ISourceContext(Interface):
    """What the framework gives a source device."""

    reactor = Attribute("The reactor.")
    migrationId = Attribute("str: the id of this migration.")
    domain = Attribute("str: the VM's name.")

    def runInThread(function, *args, **kwargs):
        """Run blocking ``function`` in xenmig's I/O thread pool; a Deferred."""

    def callPeer(method, payload):
        """
        Send a handler-scoped request to the peer target device of this device.

        @return: a Deferred firing with the peer's answer (a dict); available once the
            target accepted the device.
        """


class ITargetContext(Interface):
    """What the framework gives a target device."""

    reactor = Attribute("The reactor.")
    migrationId = Attribute("str: the id of this migration.")
    domain = Attribute("str: the VM's name.")
    peer = Attribute("str: the identity of the source host (from its certificate).")
    stagingDir = Attribute(
        "FilePath: a directory private to this device for staged state, made before "
        "C{accept} (unless L{IStagelessDevice}); removed after commit or abort."
    )
    installAs = Attribute("xenmig.fs.InstallAs: the daemon's owner and mode of images.")

    def runInThread(function, *args, **kwargs):
        """Run blocking ``function`` in xenmig's I/O thread pool; a Deferred."""

    def stagingPathFor(destination, suffix=""):
        """
        A path for staging the state that will be installed at ``destination``.

        On the same filesystem as ``destination`` (the install is an atomic rename),
        never at it; removed after an abort or a crash.  @return: a FilePath.
        """

    def resolveDestination(path):
        """
        Resolve a destination path against the allowed roots.

        @return: a L{twisted.python.filepath.FilePath} inside an allowed root.
        @raise xenmig.errors.PathNotAllowed: for ``..``, symlink or absolute escapes.
        """


class IConvergencePolicy(Interface):
    """Decides when pre-copy rounds stop and the VM may be paused."""

    def proceed(round, result):
        """
        @param round: the number of the round just sent, from 0.
        @param result: its L{xenmig.model.RoundResult}.
        @return: True to send another pre-copy round, False to stop.
        """


class IDomainControl(Interface):
    """
    How xenmig pauses, resumes and releases a whole VM for its toolstack.

    Implementations speak to the hypervisor's own tool (``xl``), to the VM's QEMU
    (QMP) or to libvirt (``virsh``).  The resume gate uses them: the source pauses
    the VM before the final transfer and resumes it only after an abort; the target
    resumes it only after the commit.  Every method is bounded; cancelling its
    Deferred stops waiting (an external program is terminated) but cannot take
    back what the hypervisor already did.
    """

    description = Attribute("str: what is controlled, e.g. 'xl domain vm1'.")

    def pause():
        """
        Stop the VM's virtual CPUs; its state stays, ready to be resumed.

        @return: a Deferred firing with None once the VM no longer runs, failing
            with L{xenmig.errors.XenmigError} (the tool's own message) if not.
        """

    def resume():
        """
        Let the VM's virtual CPUs run again (on the source after an abort, on the
        target after the commit).  @return: a Deferred firing with None once it runs.
        """

    def release():
        """
        Let go of the VM after a commit elsewhere: destroy it, or end its QEMU.
        A VM that is already gone counts as released.  @return: a Deferred (None).
        """


class IDirtyBlocks(Interface):
    """
    A source of a disk image's changed ranges, faster than reading the whole
    image: the writer of the image (the hypervisor) records its writes.

    The disk kind uses one, if it has one, to choose which blocks a pre-copy
    round and the final round read; without one, each round reads and hashes
    every data block.  A source must report every write to the image's file
    made between C{start} and the last C{collect}: a write it misses is a block
    the target never gets.
    """

    description = Attribute("str: where the changes come from, for messages.")

    def start():
        """
        Begin recording writes, before the first full pass reads the image.

        @return: a Deferred firing with None, or failing with
            L{xenmig.errors.DeviceError} naming what refused.
        """

    def collect():
        """
        The ranges written since C{start} or the previous C{collect}; recording
        goes on for the next one.  No write is lost between the two intervals.

        @return: a Deferred firing with a sorted list of ``(start, stop)`` byte
            ranges of the image file (a range may cover more than was written).
        """

    def stop():
        """
        Stop recording and leave nothing behind in the hypervisor.  Never fails;
        idempotent.  @return: a Deferred firing with None.
        """


class IReceivingSession(Interface):
    """
    A target session as its device streams see it: what the raw stream
    receiver (L{xenmig.streamreceiver.StreamReceiver}) hands it.  Each method
    names the device whose stream it is.
    """

    migrationId = Attribute("str: the id of the migration.")
    clock = Attribute("The IReactorTime that the stream's idle time-out runs on.")

    def recordReceived(name, record):
        """
        Hand one record (DATA, ZERO, METADATA, ROUND, ...) to the device.

        @return: None if the stream may go on at once, or a Deferred that fires
            when it may (the stream pauses meanwhile; a failure fails it).
        @raise xenmig.errors.XenmigError: if the record is not acceptable now
            (the stream then fails the device with that error).
        """

    def streamEnded(name, end):
        """
        The END record (an L{xenmig.records.EndRecord}) arrived: verify the device.

        @return: a Deferred firing with None once verified; a mismatch aborts
            the session rather than failing the Deferred.
        """

    def streamLost(name, why):
        """
        The stream ended before its END record (closed, cut off, idle); ``why``
        says how: the session aborts, or (resumable) waits for it.  @return: None.
        """

    def deviceFailed(name, error):
        """The stream failed the device with ``error``: abort.  @return: None."""


class IMigrationTarget(Interface):
    """
    What a target host's protocols call: the AMP control connection (with the
    peer's certificate identity, ``peer``, and fingerprint), the local socket of
    the toolstack (``peer`` None), and the stream switch.  It decides; the
    protocols only parse and answer; they send back its XenmigErrors as they are.
    """

    clock = Attribute("The IReactorTime the protocols' timers run on.")
    config = Attribute("Its TargetConfig (maxSessions, maxDevices: limits' check).")
    timeouts = Attribute(
        "The time-outs in seconds (a xenmig.target.config.Timeouts): the "
        "protocols use ``handshake`` (TLS) and ``idle`` (a silent stream)."
    )
    bandwidth = Attribute("The TokenBucket incoming streams read through, or None.")

    def authorize(peer, fingerprint=""):
        """
        What ``peer`` may do here, asked afresh for each command.

        @return: its grant.
        @raise xenmig.errors.NotAuthorized: if it may not migrate here (logged).
        """

    def prepare(peer, migrationId, domain, version, devices, fingerprint=""):
        """
        Admit a migration, then offer every device (a list of dicts: kind,
        name, size, params, precopy) to its handler; open the session if all
        accept.

        Admission happens before this returns: a Prepare refused without
        asking a handler (malformed, a duplicate id or domain, a limit, an
        unauthorized kind) raises at once.  Once it returns, the migration
        id is reserved for the caller until the Deferred fires; a
        L{controlConnectionLost} naming it meanwhile abandons it (it opens
        no session, or aborts the one it opened).

        @return: a Deferred firing with ``(protocol version, offers)``, a
            list of L{xenmig.model.DeviceOffer}; all refused if one is.
            Failing with L{xenmig.errors.JournalUnavailable} if the state
            directory could not take the session (nothing is kept).
            Cancelling it takes back what the Prepare had done.
        @raise xenmig.errors.XenmigError: a refusal at admission.
        """

    def openStream(peer, migrationId, device, fingerprint=""):
        """@return: a one-time token (bytes) for the stream of ``device``."""

    def claimToken(peer, token, fingerprint=""):
        """
        Use a stream token.

        @return: ``(session, device name)``; the session provides
            L{IReceivingSession}.
        @raise xenmig.errors.BadToken: if unknown, used, expired or another's.
        """

    def chargeStream(migrationId):
        """
        @return: a function each stream of ``migrationId`` calls with the bytes
            it received; it raises L{xenmig.errors.StreamError} past the budget.
        """

    def deviceReady(peer, migrationId, device):
        """@return: a Deferred firing with the device's verified ContentDigest."""

    def commit(peer, migrationId):
        """
        Install every device's state and release the VM (idempotent).

        @return: an awaitable firing with the list of what was installed.
        """

    def abort(peer, migrationId, reason):
        """
        Abort before commit (``peer`` None: the local toolstack).

        @return: an awaitable firing with the phase afterwards (str).
        """

    def deviceRequest(peer, migrationId, device, method, payload):
        """@return: an awaitable firing with the target device's answer (a dict)."""

    def query(migrationId, viewer=None):
        """
        @return: the status of a migration (a dict, as the wire carries it);
            a remote ``viewer`` sees only its own.
        @raise xenmig.errors.UnknownMigration: if there is none to see.
        """

    def list(limit=50, viewer=None):
        """@return: the statuses of the most recent migrations, newest first."""

    def awaitRestored(domain, timeout, migrationId=None):
        """
        @return: a Deferred firing with the L{xenmig.target.gate.Release} of the
            next unclaimed commit of ``domain`` (or of ``migrationId``); failing
            if it aborts, or after ``timeout`` seconds.  Cancelling it stops
            waiting.
        """

    def hasActiveWork(migrationIds):
        """@return: whether any of ``migrationIds`` is still running."""

    def controlConnectionLost(peer, migrationIds):
        """
        The control connection of ``peer`` holding ``migrationIds`` (or having
        them prepared) is gone: each that has not begun to commit aborts (or,
        resumable, waits to be re-attached).  @return: None.
        """
