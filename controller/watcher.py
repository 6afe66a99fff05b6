"""Keeps a ClusterView current: one load, then a prefix watch, plus periodic resyncs.

A watch dies with its stream (etcd restart, partition, member change). On any error the
watch is re-created from the last seen revision + 1, which replays what happened in the
meantime; if that revision was compacted away, or anything else goes wrong, the whole
prefix is loaded again. A periodic full load also catches a stream that hangs silently.

"The last seen revision" is the view's revision: the revision of the last event applied
(or of the last full load), never a watch header's, so a re-created watch replays exactly
what the view has not seen (see controller/view.py: catch-up batches).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from controller import loops
from controller.coordination import Coordination
from controller.store import StoreError, WatchBatch
from controller.view import ClusterView

log = logging.getLogger(__name__)


class ViewKeeper:
    def __init__(self, store: Coordination, on_change: Callable[[ClusterView], None],
                 resync_seconds: float = 10.0,
                 on_went_back: Callable[[ClusterView], None] | None = None) -> None:
        self._store = store
        self._ks = store.keyspace  # for the view's parsing of keys; the store builds none here
        self._on_change = on_change
        self._on_went_back = on_went_back or (lambda _view: None)  # told before the view is published
        self._resync = resync_seconds
        self._events: queue.Queue[WatchBatch | Exception] = queue.Queue()
        self._view = ClusterView(self._ks)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)
        self._watching = False
        # The VFS whose reconcilers the change behind the current view concerns (read by on_change,
        # on this thread; ClusterView.affected); None after a full load: anything may have changed.
        self.affected: set[str] | None = None

    @property
    def view(self) -> ClusterView:
        return self._view

    def load(self) -> ClusterView:
        """Load the whole prefix synchronously (used at start-up and on resync)."""
        revision, keys = self._store.load()
        self._publish(ClusterView.loaded(self._ks, revision, keys, previous=self._view))
        return self._view

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._events.put(RuntimeError("stopping"))
        if self._thread.ident is not None:  # an agent stopped during start-up never started it
            self._thread.join(timeout=5)

    def _publish(self, view: ClusterView, changed: frozenset[str] | None = None) -> None:
        self.affected = view.affected(self._view, changed)
        self._view = view
        self._on_change(view)

    def _start_watch(self) -> None:
        self._store.watch(self._view.revision + 1, self._events.put)
        self._watching = True
        log.debug("watching %s from revision %d", self._ks.root, self._view.revision + 1)

    def _run(self) -> None:
        next_resync = time.monotonic() + self._resync
        while not self._stop.is_set():
            try:
                next_resync = self._step(next_resync)
            except Exception as exc:  # a bug or an OSError must not freeze the view for good
                loops.record("watch", exc, logger=log)
                self._watching = False
                self._stop.wait(0.5)

    def _step(self, next_resync: float) -> float:
        """One round of the loop: wait for events (or the resync), apply them; returns next_resync."""
        try:
            if not self._watching:
                self._start_watch()
            item = self._events.get(timeout=max(0.05, next_resync - time.monotonic()))
        except queue.Empty:
            item = None
        except StoreError as exc:
            log.warning("watch could not be created: %s", exc)
            self._reload_later()
            return next_resync
        if self._stop.is_set():
            return next_resync
        if isinstance(item, Exception):
            log.warning("watch ended (%s); re-creating from revision %d", item, self._view.revision + 1)
            self._watching = False
            if "Compacted" in type(item).__name__:
                self._reload_later()
            return next_resync
        if item is not None:
            self._apply([item, *self._drain()])
        if time.monotonic() >= next_resync:
            next_resync = time.monotonic() + self._resync
            self._reload_quietly()
        return next_resync


    def _drain(self) -> list[WatchBatch | Exception]:
        items = []
        while True:
            try:
                items.append(self._events.get_nowait())
            except queue.Empty:
                return items

    def _apply(self, items: list[WatchBatch | Exception]) -> None:
        view = self._view
        keys: set[str] = set()
        for item in items:
            if isinstance(item, Exception):
                self._watching = False
                continue
            view = view.applied(item.revision, item.events)
            keys.update(key for key, _record, _rev in item.events)
        self._publish(view, frozenset(keys))

    def _reload_quietly(self) -> bool:
        try:
            revision, keys = self._store.load()
        except StoreError as exc:
            log.warning("resync failed: %s", exc)
            return False
        if revision < self._view.revision:
            # Linearizable reads never go back in time, unless etcd itself did: restored from a
            # snapshot. A watch from our revision + 1 would wait for revisions that are numbered
            # anew; events still queued from the old watch carry the old numbering: drop them and
            # start over from what etcd has now (docs/safety.md, "etcd restored from a snapshot").
            log.warning("etcd's revision went back from %d to %d (restored from a snapshot?): reloading",
                        self._view.revision, revision)
            self._watching = False
            self._drain()
            view = ClusterView(self._ks, revision, keys)
            self._on_went_back(view)
            self._publish(view)
            return True
        # Only what differs from the view wakes reconcilers: a periodic resync that found nothing new
        # (the usual case) costs one comparison per key, not a reconcile pass of every VFS. Whole
        # records are compared: a restored etcd that climbed back past our revision can reuse a
        # mod_revision for other content.
        old = self._view.keys
        changed = {key for key, record in keys.items() if old.get(key) != record}
        changed.update(old.keys() - keys.keys())
        self._publish(ClusterView.loaded(self._ks, revision, keys, previous=self._view), frozenset(changed))
        return True

    def _reload_later(self) -> None:
        self._watching = False
        if not self._reload_quietly():
            self._stop.wait(0.5)
