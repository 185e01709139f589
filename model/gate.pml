/*
 * The resume gate of xenmig, as a Promela model checked exhaustively by spin.
 *
 * What it is: the protocol that decides on which host a migrating VM resumes,
 * between the source toolstack (xenmig.source.migration.SourceMigration and the
 * toolstack that drives it, doc/examples/migrate_example.py), the target daemon
 * (xenmig.target: session.py, core.py, journal.py, gate.py, admission.py) and the
 * target toolstack's waiter (AwaitRestored, `xenmig await`).  doc/gate-model.md
 * says what is modelled, proven and assumed; tests/test_model.py runs it.
 *
 * The shape: guarded commands.  Each `atomic` block is one turn of a reactor
 * (no await inside it); every await point of the code is a boundary between two
 * blocks, where any other process, the network or a crash may step in.  A
 * journal write is started in one block and finishes (or fails) in a later one,
 * as the daemon's writes run in its thread pool.
 *
 * Bounds (each can be changed with spin -DNAME=VALUE; the defaults):
 *   NMIG     migrations of the one domain (after an abort the source
 *            toolstack may try again, with a new id)                     2
 *   NDEV     devices of a migration (each installed by its own step)     2
 *   CRASHES  target daemon crashes (memory lost; journal, installs kept)  1
 *   LOSSES   messages lost, either direction                             1
 *   DUPS     messages to the target delivered twice (Prepare, Commit)    1
 *   JFAILS   journal writes that fail (state directory full, I/O error)  1
 *   IFAILS   device installs that fail (a handler's commit)              1
 *
 * The properties are the `ltl` formulas at the end: exclusive, committed,
 * released_once, abort_clean, one_session (safety: pan -N NAME with
 * -DSAFETY), ends and vm_runs (liveness: pan -a -f -N NAME).
 *
 * The tie to the code (tests/test_model.py checks it, without spin and with it):
 *   - the mtype T_* are xenmig.target.session.Phase, the mtype S_* are
 *     xenmig.source.phase.Phase (by enum member name);
 *   - every change of a phase is written tmove(m, T_FROM, T_TO) (target
 *     session, in memory) or smove(m, S_FROM, S_TO) (SourceMigration), with the
 *     phases spelled out: the test reads these as the model's edges and
 *     compares them, both ways, with the code's TRANSITIONS; spin asserts at
 *     each one that the phase really was FROM, and the test fails if pan
 *     reports any statement of the model unreached;
 *   - T_START / S_START and T_FINAL are compared with the code too.
 *   Code that only a broken variant or a proposed fix compiles sits in
 *   #ifdef BUG_... / FIX_... blocks; its moves do not count.
 *
 * Deliberately broken variants (spin -DBUG_...), each caught by the named
 * property (tests/test_model.py checks that spin finds a counterexample):
 *   BUG_EARLY_ANSWER      Commit answered once installed, before COMMITTED is
 *                         durable                                  -> committed
 *   BUG_RECOVERY_FINISHES recovery turns COMMITTING into COMMITTED instead of
 *                         reversing it                             -> exclusive
 *   BUG_CLAIM_UNJOURNALLED the waiter resumes the VM before its claim is
 *                         durable                                  -> released_once
 *   BUG_QUERY_EARLY       QueryMigration sees COMMITTED before it is durable
 *                         (the phase is set, then journalled)      -> committed
 *   BUG_SOURCE_ROLLBACK   the source rolls back on any error answering Commit,
 *                         not only a definite refusal              -> exclusive
 *   BUG_KEEP_INSTALLS     a failed or interrupted commit leaves what it had
 *                         installed                                -> abort_clean
 *   BUG_ADMIT_UNRESERVED  a Prepare's domain check ignores Prepares still
 *                         being accepted                           -> one_session
 *   BUG_NO_DEADLINE       no phase deadline, no abort on a lost control
 *                         connection (run with FAIR_NETWORK)       -> ends
 * A proposed fix: FIX_CLAIM_RETRY (a waiter cut off by a crash asks again
 * with its key and is answered its durable claim) makes vm_runs hold.
 */

#ifndef NMIG
#define NMIG 2
#endif
#ifndef NDEV
#define NDEV 2
#endif
#ifndef CRASHES
#define CRASHES 1
#endif
#ifndef LOSSES
#define LOSSES 1
#endif
#ifndef DUPS
#define DUPS 1
#endif
#ifndef JFAILS
#define JFAILS 1
#endif
#ifndef IFAILS
#define IFAILS 1
#endif

/* ---- phases ------------------------------------------------------------------
 * xenmig.target.session.Phase (one line, T_ + the member's name) */
mtype = { T_PREPARED, T_RECEIVING, T_READY, T_COMMITTING, T_COMMITTED, T_ABORTED };
/* xenmig.source.phase.Phase (one line, S_ + the member's name) */
mtype = { S_NEW, S_PREPARED, S_PRECOPY, S_PRECOPIED, S_TRANSFER, S_READY, S_COMMITTING, S_COMMITTED, S_IN_DOUBT, S_ABORTED };

/* TargetSession.__init__ and SourceMigration.__init__ */
#define T_START T_PREPARED
#define S_START S_NEW
/* xenmig.target.session.FINAL */
#define T_FINAL(p) (p == T_COMMITTED || p == T_ABORTED)
#define T_UNFINISHED(p) (p == T_PREPARED || p == T_RECEIVING || p == T_READY || p == T_COMMITTING)

/* The only way a phase changes (see the header) */
#define tmove(m, a, b) assert(tph[m] == a); tph[m] = b
#define smove(m, a, b) assert(sph[m] == a); sph[m] = b

/* ---- the target daemon ----------------------------------------------------------
 * Memory (lost in a crash): the session's phase (TargetSession.phase, 0: no
 * session), a Prepare being accepted (Admission's reservation), where a commit
 * is (TargetSession.commit's awaits), the gate's unclaimed releases.
 * Durable (kept): the journal's phase and claim (Journal, MigrationRecord
 * .phase / .claimed) and what is installed on the host (the handlers' commit). */
mtype tph[NMIG];        /* memory: TargetSession.phase */
bit tres[NMIG];         /* memory: a Prepare admitted, its handlers still accepting */
byte cpc[NMIG];         /* memory: where TargetSession.commit is (C_*) */
bit gated[NMIG];        /* memory: ResumeGate._unclaimed holds its Release */
mtype jph[NMIG];        /* durable: the journal record's phase (0: none) */
bit jcl[NMIG];          /* durable: MigrationRecord.claimed */
byte inst[NMIG];        /* durable: devices installed (0..NDEV) */

#define C_IDLE 0
#define C_JCOMMITTING 1  /* COMMITTING (with what it will install) being journalled */
#define C_INSTALL 2      /* installing device inst[m]+1 */
#define C_JCOMMITTED 3   /* every device installed; COMMITTED being journalled */
#define C_JABORTED 4     /* the commit failed and was reversed; ABORTED being journalled */

byte aw;                /* the target toolstack's waiter: 0 idle, m+1 claiming m,
                           ANSWERED+m its answer on the way */
#define ANSWERED 8

/* ---- the source toolstack ----------------------------------------------------- */
mtype sph[NMIG];        /* SourceMigration.phase */
byte dec[NMIG];         /* what the toolstack did with the VM for migration m */
#define D_NONE 0
#define D_RESUME 1      /* the VM runs here again (or was never paused) */
#define D_RELEASE 2     /* the VM is destroyed here: it belongs to the target */
byte srcVM;             /* the VM on the source host */
#define V_RUNNING 1
#define V_PAUSED 2
#define V_GONE 3
bit srcDone;            /* the source toolstack has nothing more to do */

/* ---- the target host's VM (ghosts for the properties) --------------------------- */
bit tgtRun;             /* the target toolstack resumed the VM */
byte tvm;               /* ... for that migration */
byte claims;            /* how often the VM was released on the target (saturates at 2) */

/* ---- the network: a set of messages in flight per migration and direction --------
 * Any message may be delivered in any order (reordering), delivered and kept for
 * a second delivery (DUPS), or lost (LOSSES).  A lost connection is a loss plus
 * the time-out it causes. */
#define M_PREPARE 1
#define M_DATA 2        /* the device streams, END records and DeviceReady */
#define M_ABORT 4       /* Abort, or the loss of the control connection that prepared it */
#define M_COMMIT 8
#define M_QUERY 16      /* QueryMigration */
byte tnet[NMIG];        /* to the target */
#define R_PREP_OK 1     /* Prepare: every device accepted */
#define R_READY 2       /* DeviceReady: verified and staged */
#define R_C_OK 4        /* Commit: installed */
#define R_C_NO 8        /* Commit: COMMIT_FAILED or MIGRATION_ABORTED, a definite refusal */
#define R_C_ERR 16      /* Commit: any other error (INVALID_TRANSITION, INTERNAL, ...) */
#define R_S_COMMITTED 32 /* QueryMigration: phase COMMITTED */
#define R_S_ABORTED 64  /* QueryMigration: phase ABORTED */
#define R_S_OTHER 128   /* QueryMigration: any other phase, or UNKNOWN_MIGRATION */
#define R_STATUS (R_S_COMMITTED | R_S_ABORTED | R_S_OTHER)
byte snet[NMIG];        /* to the source */

/* the adversary's budgets, spent */
byte losses, dups, crashes, jfails, ifails;

/* send message k: it is in flight, or (LOSSES) lost on the way.  When a message
 * is lost does not matter (nothing reads the network but its receiver), so the
 * model loses it as it is sent. */
inline sendT(m, k) {
  if
  :: tnet[m] = tnet[m] | k
  :: losses < LOSSES -> losses++
  fi
}
inline sendS(m, k) {
  if
  :: snet[m] = snet[m] | k
  :: losses < LOSSES -> losses++
  fi
}
/* take message k (present): delivered once, or (DUPS) kept for a second delivery.
 * Only a Prepare or a Commit is worth duplicating: a second DATA finds its
 * session no longer PREPARED, an Abort is idempotent, a second status question
 * answers the truth again, and so does a second answer. */
#define DUPLICABLE (M_PREPARE | M_COMMIT)
inline takeT(m, k) {
  if
  :: tnet[m] = tnet[m] & ~k
  :: (k & DUPLICABLE) && dups < DUPS -> dups++
  fi
}
inline takeS(m, k) {
  snet[m] = snet[m] & ~k  /* a duplicated answer repeats what its question would: not modelled */
}

/* ================================================================================
 * The source: SourceMigration (prepare, precopy, transfer, commit, _resolveDoubt,
 * abort / _failed) and the toolstack around it (migrate_example.migrate: pause,
 * resume; after IN-DOUBT it asks again: `xenmig status ID`, client.query).
 * Time-outs are nondeterminism: any wait for Prepare, DeviceReady or Commit may
 * end at any moment, whatever is in flight.  A wait for a status ends without an
 * answer only when the question or its answer was lost.
 * ================================================================================ */

/* _failed: Abort (best effort; or the control connection drops), the source
 * handlers roll back, and the toolstack resumes the VM here. */
inline abortSource(m) {
  sendT(m, M_ABORT);
  dec[m] = D_RESUME;
  srcVM = V_RUNNING
}
/* _release: the target has the VM; the toolstack destroys it here. */
inline releaseSource(m) {
  dec[m] = D_RELEASE;
  srcVM = V_GONE
}
#define STATUS_LOST(m) (!(tnet[m] & M_QUERY) && !(snet[m] & R_STATUS))

proctype Source() {
  byte m = 0;
  /* prepare(): before the VM is paused, so a refusal costs nothing */
  sendT(m, M_PREPARE);
prepared:
  if
  :: atomic { (snet[m] & R_PREP_OK) -> takeS(m, R_PREP_OK); smove(m, S_NEW, S_PREPARED) }
  :: atomic { smove(m, S_NEW, S_ABORTED); abortSource(m) }; goto next
     /* refused (DUPLICATE_MIGRATION, a handler), time-out, lost connection */
  fi;
  /* precopy() while the VM runs, or straight to transfer(); or the toolstack gives up */
  if
  :: smove(m, S_PREPARED, S_PRECOPY);
     if
     :: smove(m, S_PRECOPY, S_PRECOPIED)
     :: atomic { smove(m, S_PRECOPY, S_ABORTED); abortSource(m) }; goto next
     fi;
     if
     :: atomic { smove(m, S_PRECOPIED, S_TRANSFER); srcVM = V_PAUSED; sendT(m, M_DATA) }
     :: atomic { smove(m, S_PRECOPIED, S_ABORTED); abortSource(m) }; goto next
     fi
  :: atomic { smove(m, S_PREPARED, S_TRANSFER); srcVM = V_PAUSED; sendT(m, M_DATA) }
  :: atomic { smove(m, S_PREPARED, S_ABORTED); abortSource(m) }; goto next
  fi;
  /* transfer(): the toolstack paused the VM; every DeviceReady must answer */
  if
  :: atomic { (snet[m] & R_READY) -> takeS(m, R_READY); smove(m, S_TRANSFER, S_READY) }
  :: atomic { smove(m, S_TRANSFER, S_ABORTED); abortSource(m) }; goto next
     /* a device failed, a digest mismatch, a time-out: transfer() aborts, the VM resumes */
  fi;
  /* READY: commit(), or the last moment the toolstack may still give up */
  if
  :: atomic { smove(m, S_READY, S_COMMITTING); sendT(m, M_COMMIT) }
  :: atomic { smove(m, S_READY, S_ABORTED); abortSource(m) }; goto next
  fi;
  /* Commit sent (COMMITTING: abort() is refused): from here the source never aborts
   * on its own.  Any answer but a
   * definite refusal, or none (a time-out, a lost connection): _resolveDoubt,
   * QueryMigration on a new connection */
  if
  :: atomic { (snet[m] & R_C_OK) -> takeS(m, R_C_OK); smove(m, S_COMMITTING, S_COMMITTED); releaseSource(m) }; goto finished
  :: atomic { (snet[m] & R_C_NO) -> takeS(m, R_C_NO); smove(m, S_COMMITTING, S_ABORTED); abortSource(m) }; goto next
#ifdef BUG_SOURCE_ROLLBACK
  :: atomic { (snet[m] & R_C_ERR) -> takeS(m, R_C_ERR); smove(m, S_COMMITTING, S_ABORTED); abortSource(m) }; goto next
#else
  :: atomic { (snet[m] & R_C_ERR) -> takeS(m, R_C_ERR); sendT(m, M_QUERY) }
#endif
  :: sendT(m, M_QUERY)
  fi;
  if
  :: atomic { (snet[m] & R_S_COMMITTED) -> takeS(m, R_S_COMMITTED); smove(m, S_COMMITTING, S_COMMITTED); releaseSource(m) }; goto finished
  :: atomic { (snet[m] & R_S_ABORTED) -> takeS(m, R_S_ABORTED); smove(m, S_COMMITTING, S_ABORTED); abortSource(m) }; goto next
  :: atomic { (snet[m] & R_S_OTHER) -> takeS(m, R_S_OTHER); smove(m, S_COMMITTING, S_IN_DOUBT); sendT(m, M_QUERY) }
  :: atomic { STATUS_LOST(m) -> smove(m, S_COMMITTING, S_IN_DOUBT); sendT(m, M_QUERY) }
  fi;
  /* IN-DOUBT (final for SourceMigration): the toolstack keeps the VM paused and
   * asks again, until the target says COMMITTED or ABORTED */
  do
  :: atomic { (snet[m] & R_S_COMMITTED) -> takeS(m, R_S_COMMITTED); releaseSource(m) }; goto finished
  :: atomic { (snet[m] & R_S_ABORTED) -> takeS(m, R_S_ABORTED); dec[m] = D_RESUME; srcVM = V_RUNNING }; goto next
  :: atomic { (snet[m] & R_S_OTHER) -> takeS(m, R_S_OTHER); sendT(m, M_QUERY) }
  :: atomic { STATUS_LOST(m) -> sendT(m, M_QUERY) }
  od;
next:
  /* the migration ended and the VM runs here: the toolstack may try again, with a new id */
  if
  :: atomic { m + 1 < NMIG -> m++; sendT(m, M_PREPARE) }; goto prepared
  :: skip
  fi;
finished:
  srcDone = 1
}

/* ================================================================================
 * The target daemon: what MigrationTarget does with each command (core.py,
 * prepare.py, admission.py, session.py), one reactor turn per message.
 * ================================================================================ */

/* Admission.checkHost: at most one unfinished session per domain (every
 * migration here is of the same domain), counting the Prepares still being
 * accepted: the check and the reservation are one step. */
#ifdef BUG_ADMIT_UNRESERVED
#define BUSY(o) (T_UNFINISHED(tph[o]))
#else
#define BUSY(o) (tres[o] || T_UNFINISHED(tph[o]))
#endif
#if NMIG > 1
#define DOMAIN_BUSY(m) ((m != 0 && BUSY(0)) || (m != 1 && BUSY(1)))
#else
#define DOMAIN_BUSY(m) (false)
#endif

inline onPrepare(m) {
  if
  :: tph[m] != 0 || tres[m] -> skip  /* DUPLICATE_MIGRATION: the id is known */
  :: else ->
     if
     :: DOMAIN_BUSY(m) -> skip       /* DUPLICATE_MIGRATION: the domain is being migrated */
     :: else -> tres[m] = 1           /* admitted: its handlers accept (TargetWork) */
     fi
  fi
  /* a refusal is answered; the model leaves it to the source's time-out, the same step */
}

/* the first stream starts: PREPARED -> RECEIVING; the data is verified in TargetWork */
inline onData(m) {
  if
  :: tph[m] == T_PREPARED -> tmove(m, T_PREPARED, T_RECEIVING); jph[m] = T_RECEIVING
  :: else -> skip                     /* MIGRATION_ABORTED, BAD_TOKEN, ... */
  fi
}

/* MigrationTarget.abort, controlConnectionLost: only before COMMITTING.  The
 * ABORTED record is journalled after the phase changes; a crash in between
 * aborts the session anyway, so the model writes both at once. */
inline abortEarly(m) {
  if
  :: tph[m] == T_PREPARED -> tmove(m, T_PREPARED, T_ABORTED); jph[m] = T_ABORTED
  :: tph[m] == T_RECEIVING -> tmove(m, T_RECEIVING, T_ABORTED); jph[m] = T_ABORTED
  :: tph[m] == T_READY -> tmove(m, T_READY, T_ABORTED); jph[m] = T_ABORTED
  :: else -> skip                     /* INVALID_TRANSITION (committing, committed), idempotent */
  fi
}

/* MigrationTarget.commit / TargetSession.commit */
inline onCommit(m) {
  if
  :: tph[m] == T_READY -> tmove(m, T_READY, T_COMMITTING); cpc[m] = C_JCOMMITTING
  :: tph[m] == T_COMMITTED -> sendS(m, R_C_OK)        /* asked again: the same answer */
  :: tph[m] == T_ABORTED && cpc[m] == C_IDLE -> sendS(m, R_C_NO)  /* MIGRATION_ABORTED, COMMIT_FAILED */
  :: else -> sendS(m, R_C_ERR)        /* not READY, already committing, unknown */
  fi
}

/* QueryMigration answers from memory (MigrationHistory.status) */
inline onQuery(m) {
  if
  :: tph[m] == T_COMMITTED -> sendS(m, R_S_COMMITTED)
  :: tph[m] == T_ABORTED -> sendS(m, R_S_ABORTED)
  :: else -> sendS(m, R_S_OTHER)
  fi
}

/* FAIR_NETWORK (for the liveness runs of broken variants): the network
 * eventually delivers every message.  Weak fairness alone lets the target's
 * receiver serve one stream of messages (a source asking again and again) and
 * never another; with this, a message passed over by a delivery is "late", and
 * late messages go before any other.  The proven properties do not need it. */
#ifdef FAIR_NETWORK
byte late[NMIG];
#if NMIG > 1
#define ANY_LATE (late[0] != 0 || late[1] != 0)
#else
#define ANY_LATE (late[0] != 0)
#endif
#define MAY(m, k) (!ANY_LATE || (late[m] & k))
#define DELIVERABLE(m) (tnet[m] != 0 && (!ANY_LATE || late[m] != 0))
inline delivered(m, k) {
  late[0] = tnet[0];
#if NMIG > 1
  late[1] = tnet[1];
#endif
  late[m] = late[m] & ~k
}
#else
#define MAY(m, k) (true)
#define DELIVERABLE(m) (tnet[m] != 0)
inline delivered(m, k) { skip }
#endif

inline deliver(m) {
  if
  :: (tnet[m] & M_PREPARE) && MAY(m, M_PREPARE) -> takeT(m, M_PREPARE); delivered(m, M_PREPARE); onPrepare(m)
  :: (tnet[m] & M_DATA) && MAY(m, M_DATA) -> takeT(m, M_DATA); delivered(m, M_DATA); onData(m)
  :: (tnet[m] & M_ABORT) && MAY(m, M_ABORT) -> takeT(m, M_ABORT); delivered(m, M_ABORT); abortEarly(m)
  :: (tnet[m] & M_COMMIT) && MAY(m, M_COMMIT) -> takeT(m, M_COMMIT); delivered(m, M_COMMIT); onCommit(m)
  :: (tnet[m] & M_QUERY) && MAY(m, M_QUERY) -> takeT(m, M_QUERY); delivered(m, M_QUERY); onQuery(m)
  fi
}

proctype TargetNet() {
  do
  :: atomic { DELIVERABLE(0) -> deliver(0) }
#if NMIG > 1
  :: atomic { DELIVERABLE(1) -> deliver(1) }
#endif
  od
}

/* ---- what the daemon does between messages: its awaits ------------------------ */

/* the gate learns of a commit: AwaitRestored may claim it (core._release) */
inline committedNow(m) {
  tmove(m, T_COMMITTING, T_COMMITTED);
  gated[m] = 1;
  cpc[m] = C_IDLE;
  sendS(m, R_C_OK)
}
/* reverse what was installed (the plan is in the COMMITTING record), then ABORTED */
inline reverseCommit(m) {
#ifndef BUG_KEEP_INSTALLS
  inst[m] = 0;
#endif
  tmove(m, T_COMMITTING, T_ABORTED);
  cpc[m] = C_JABORTED
}

inline work(m) {
  if
  /* Preparation: every handler accepted; PREPARED is durable before the answer */
  :: tres[m] -> tres[m] = 0; tph[m] = T_START; jph[m] = T_PREPARED; sendS(m, R_PREP_OK)
  /* every device's END record verified: READY, DeviceReady answers */
  :: tph[m] == T_RECEIVING -> tmove(m, T_RECEIVING, T_READY); jph[m] = T_READY; sendS(m, R_READY)
#ifndef BUG_NO_DEADLINE
  /* a phase deadline, an idle stream, a digest mismatch, the control connection lost */
  :: T_UNFINISHED(tph[m]) && tph[m] != T_COMMITTING -> abortEarly(m)
#endif
  /* the commit, step by step (write-ahead: COMMITTING before any install) */
  :: cpc[m] == C_JCOMMITTING -> jph[m] = T_COMMITTING; cpc[m] = C_INSTALL
  :: cpc[m] == C_JCOMMITTING && jfails < JFAILS -> jfails++;
     /* nothing installed: ABORTED, COMMIT_FAILED */
     tmove(m, T_COMMITTING, T_ABORTED); cpc[m] = C_JABORTED
  :: cpc[m] == C_INSTALL && inst[m] < NDEV -> inst[m]++
  :: cpc[m] == C_INSTALL && inst[m] < NDEV && ifails < IFAILS -> ifails++; reverseCommit(m)
  :: cpc[m] == C_INSTALL && inst[m] == NDEV -> cpc[m] = C_JCOMMITTED
#ifdef BUG_EARLY_ANSWER
     ; sendS(m, R_C_OK)
#endif
#ifdef BUG_QUERY_EARLY
     ; tmove(m, T_COMMITTING, T_COMMITTED)
  :: cpc[m] == C_JCOMMITTED -> jph[m] = T_COMMITTED; gated[m] = 1; cpc[m] = C_IDLE; sendS(m, R_C_OK)
  :: cpc[m] == C_JCOMMITTED && jfails < JFAILS -> jfails++; cpc[m] = C_IDLE; sendS(m, R_C_ERR)
#else
  /* COMMITTED durable, and only then known, released and answered */
  :: cpc[m] == C_JCOMMITTED -> jph[m] = T_COMMITTED; committedNow(m)
  :: cpc[m] == C_JCOMMITTED && jfails < JFAILS -> jfails++; reverseCommit(m)
#endif
  /* the reversed commit's ABORTED: durable, then COMMIT_FAILED */
  :: cpc[m] == C_JABORTED -> jph[m] = T_ABORTED; cpc[m] = C_IDLE; sendS(m, R_C_NO)
  :: cpc[m] == C_JABORTED && jfails < JFAILS -> jfails++; cpc[m] = C_IDLE; sendS(m, R_C_ERR)
  fi
}

#ifdef BUG_NO_DEADLINE
#define WORK(m) (tres[m] || tph[m] == T_RECEIVING || cpc[m] != C_IDLE)
#else
#define WORK(m) (tres[m] || (T_UNFINISHED(tph[m]) && tph[m] != T_COMMITTING) || cpc[m] != C_IDLE)
#endif

proctype TargetWork() {
  do
  :: atomic { WORK(0) -> work(0) }
#if NMIG > 1
  :: atomic { WORK(1) -> work(1) }
#endif
  od
}

/* ---- a crash and the restart: Journal.recoverRecords, MigrationTarget.recover ---- */
inline recoverOne(m) {
  tres[m] = 0;
  cpc[m] = C_IDLE;
  if
  :: jph[m] == T_PREPARED || jph[m] == T_RECEIVING || jph[m] == T_READY -> jph[m] = T_ABORTED
#ifdef BUG_RECOVERY_FINISHES
  :: jph[m] == T_COMMITTING -> jph[m] = T_COMMITTED
#else
  /* an interrupted commit is reversed: the source cannot have been told COMMITTED */
#ifdef BUG_KEEP_INSTALLS
  :: jph[m] == T_COMMITTING -> jph[m] = T_ABORTED
#else
  :: jph[m] == T_COMMITTING -> inst[m] = 0; jph[m] = T_ABORTED
#endif
#endif
  :: else -> skip
  fi;
  tph[m] = jph[m];
  gated[m] = (jph[m] == T_COMMITTED && !jcl[m])
}

proctype Crasher() {
  do
  :: atomic {
       crashes < CRASHES -> crashes++;
       recoverOne(0);
#if NMIG > 1
       recoverOne(1);
#endif
#ifdef FIX_CLAIM_RETRY
       /* the waiter asks again with the same key: a durable claim answers it again */
       if
       :: aw >= ANSWERED -> skip
       :: else -> aw = 0
       fi
#else
       aw = 0  /* the waiter's socket is gone: its wait failed, it does not resume */
#endif
     }
  :: break  /* no more crashes (so that weak fairness does not force them) */
  od
}

/* ================================================================================
 * The target toolstack: `xenmig await --domain D` (AwaitRestored, ResumeGate.wait)
 * in a loop; it resumes the VM for each migration handed to it.  The gate hands
 * an unclaimed commit to one waiter and journals the claim; the waiter's answer
 * (and so the resume) comes only once the claim is durable.
 * ================================================================================ */
inline resumeTarget(m) {
  assert(tph[m] == T_COMMITTED);
  tgtRun = 1;
  tvm = m;
  if
  :: claims < 2 -> claims++
  :: else -> skip
  fi
}

inline claim(m) {
  if
  /* ResumeGate.wait: an unclaimed commit of the domain; History.claim journals it */
  :: aw == 0 && gated[m] -> gated[m] = 0; aw = m + 1
#ifdef BUG_CLAIM_UNJOURNALLED
     ; resumeTarget(m)
#endif
  /* the claim is durable: the answer goes to the waiter */
  :: aw == m + 1 -> jcl[m] = 1; aw = ANSWERED + m
  /* the claim could not be journalled: the waiter gets an error, no resume */
  :: aw == m + 1 && jfails < JFAILS -> jfails++; gated[m] = 1; aw = 0
  /* the answer arrives: the toolstack resumes the VM here */
  :: aw == ANSWERED + m -> aw = 0
#ifndef BUG_CLAIM_UNJOURNALLED
     ; resumeTarget(m)
#endif
  fi
}
#define CLAIMING(m) ((aw == 0 && gated[m]) || aw == m + 1 || aw == ANSWERED + m)

proctype Awaiter() {
  do
  :: atomic { CLAIMING(0) -> claim(0) }
#if NMIG > 1
  :: atomic { CLAIMING(1) -> claim(1) }
#endif
  od
}

/* When nothing else can move, time passes.  This makes a state where the system
 * has come to rest an infinite run (spin's weak fairness does not extend a run
 * that simply stops), so that `ends` also judges the states it rests in. */
proctype Time() {
  do
  :: timeout -> skip
  od
}

init {
  atomic {
    byte i;
    for (i : 0 .. NMIG - 1) {
      sph[i] = S_START
    }
    srcVM = V_RUNNING;
    run Source();
    run TargetNet();
    run TargetWork();
    run Awaiter();
    run Crasher();
    run Time()
  }
}

/* ================================================================================
 * The properties.  The safety ones are checked exhaustively with -DSAFETY, one
 * run each (pan -N name); `ends` and `vm_runs` with weak fairness (pan -a -f).
 * (one_session says nothing with one migration.)
 * ================================================================================ */

#if NMIG > 1
#define ALL(P) (P(0) && P(1))
#define ANY(P) (P(0) || P(1))
#else
#define ALL(P) (P(0))
#define ANY(P) (P(0))
#endif

/* the VM never runs on both hosts */
ltl exclusive { [] !(srcVM == V_RUNNING && tgtRun) }

/* a committed migration is never rolled back nor lost: once COMMITTED is durable
 * it stays, the source never resumes the VM, and the source releases the VM only
 * for a migration durably COMMITTED */
#define KEPT(m) (jph[m] != T_COMMITTED || [] (jph[m] == T_COMMITTED && srcVM != V_RUNNING && dec[m] != D_RESUME))
#define NOT_LOST(m) (dec[m] != D_RELEASE || jph[m] == T_COMMITTED)
ltl committed { [] (ALL(KEPT) && ALL(NOT_LOST)) }

/* no domain is released twice: at most one resume on the target, across
 * migrations and restarts; and only with every device installed */
ltl released_once { [] (claims <= 1 && (!tgtRun || inst[tvm] == NDEV)) }

/* an abort never installs anything: an ABORTED session (once its commit's
 * reversal is done) and an ABORTED journal record have nothing installed */
#define CLEAN(m) ((tph[m] != T_ABORTED || cpc[m] != C_IDLE || inst[m] == 0) && (jph[m] != T_ABORTED || inst[m] == 0))
ltl abort_clean { [] ALL(CLEAN) }

/* atomic admission: at most one unfinished session (or admitted Prepare) per domain */
#define OPEN(m) (tres[m] || T_UNFINISHED(tph[m]))
#if NMIG > 1
ltl one_session { [] !(OPEN(0) && OPEN(1)) }
#else
ltl one_session { [] true }
#endif

/* every migration ends: the source toolstack has decided, and every session is
 * COMMITTED or ABORTED with nothing left to do.  Under weak fairness of the
 * processes (pan -f); the adversary's budgets are finite, so losses and crashes
 * stop.  It holds even without FAIR_NETWORK: a message passed over for ever
 * leaves its session to a deadline. */
#define SETTLED(m) (!tres[m] && (tph[m] == 0 || T_FINAL(tph[m])) && cpc[m] == C_IDLE)
ltl ends { <> [] (srcDone && ALL(SETTLED)) }

/* ... and the VM then runs on exactly one host */
ltl vm_runs { <> [] ((srcVM == V_RUNNING) != tgtRun) }
