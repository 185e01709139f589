"""
How xend migrates a domain with xenmig's hooks, reduced to the device steps.

``domain_migrate`` and ``XendCheckpoint.save`` of xend, with everything but the
order of calls left out; ``tests/test_xend.py`` runs it.
"""

from xenmig.errors import CommitInDoubt
from xenmig.toolstack.xend import (
    DEV_MIGRATE_STEP1,
    DEV_MIGRATE_STEP2,
    DEV_MIGRATE_STEP3,
    DEV_MIGRATE_TEST,
)


def migrateDomain(hooks, domain, configs, dst, sendMemory):
    """
    Move ``domain`` to ``dst``: its devices through ``hooks`` (a
    XendMigrationHooks; each device controller's migrate and recover_migrate
    call it), its memory through ``sendMemory(final)`` (xc_save).
    """
    name = domain.name
    for config in configs:  # testMigrateDevices
        if hooks.migrate(config, True, dst, DEV_MIGRATE_TEST, name) != 0:
            raise RuntimeError(f"{name} cannot go: {hooks.reason(name)}")
    done = DEV_MIGRATE_TEST
    try:
        for config in configs:  # before xc_save starts
            hooks.migrate(config, True, dst, DEV_MIGRATE_STEP1, name)
        done = DEV_MIGRATE_STEP1
        sendMemory(final=False)  # xc_save's live rounds, until it asks to suspend
        domain.suspend()
        for step in (DEV_MIGRATE_STEP2, DEV_MIGRATE_STEP3):  # saveInputHandler
            for config in configs:
                hooks.migrate(config, True, dst, step, name)
            done = step
        sendMemory(final=True)  # the last pages and the vCPU state
        hooks.commit(name)  # added to xend: the point of no return
    except CommitInDoubt:
        raise  # neither resume nor destroy the domain: ask the target first
    except Exception:
        for config in configs:  # migrateDevices' recovery
            hooks.recover_migrate(config, True, dst, done, name)
        domain.resume()
        raise
    domain.destroy()
