"""EM refits of the incremental index's Fellegi–Sunter parameters.

Every batch's candidate pairs are compared anyway, so their comparison vectors are *counted* (distinct
vector -> count, persisted as ``mpi_meta.em_patterns`` with the batch). The index fits EM on those counts
once it holds ``em_min_records`` records and again each time it has grown by ``em_refit_factor``: a fit
costs O(distinct vectors), no re-comparison. A forced fit (:func:`fit` with ``incremental=False``)
re-derives everything from the stored records, on the candidate pairs of a systematic sample of at most
``em_sample_records`` of them.
"""

from __future__ import annotations

import numpy as np
import orjson

from bridge.logging import get_logger
from bridge.stores.mpi.blocking import blocking_keys, candidate_pairs
from bridge.stores.mpi.cache import add_patterns, dump_patterns, patterns_array
from bridge.stores.mpi.compare import FIELDS, compare_pairs
from bridge.stores.mpi.matcher import fit_patterns
from bridge.stores.mpi.model import FSModel
from bridge.stores.mpi.state import IndexState

log = get_logger(__name__)


def maybe_fit(state: IndexState, total: int) -> None:
    """Fit inside a batch if the index, now ``total`` records, is due for its first fit or a refit."""
    cfg = state.config
    if total < cfg.em_min_records:
        return
    fitted_on = state.model_from(state.batch_model_blob()).fitted_on_records  # the priors: 0
    if fitted_on and total < fitted_on * cfg.em_refit_factor:
        return
    fit(state, total=total, incremental=True)


def refit(state: IndexState, total: int | None = None) -> FSModel:
    """A forced fit from the stored records, in its own transaction (:meth:`PersonIndex.fit`)."""
    try:
        return fit(state, total=total, incremental=False)
    except BaseException:
        state.forget()  # rolled back: the cached EM counts may be ahead of the database
        raise


def fit(state: IndexState, *, total: int | None, incremental: bool) -> FSModel:
    """EM fit, stored as ``mpi_meta.model``. ``incremental``: from the comparison vectors counted while
    scoring (no re-comparison), when they are known; otherwise from the candidate pairs of a systematic
    sample of the records. ``total``: the record count to fit for (None: the cache's)."""
    config = state.config
    with state.db.write():
        cache = state.records()
        if total is None:
            total = len(cache)
        if incremental and cache.patterns is not None:
            patterns, counts = patterns_array(cache.patterns, len(FIELDS))
            sampled, pairs = total, int(counts.sum())
        else:
            step = max(1, -(-total // config.em_sample_records))
            sample = np.nonzero(cache.seqs() % step == 0)[0]
            ids = cache.ids
            keys = [blocking_keys(cache.features(ids[r])) for r in sample.tolist()]
            ia, ib, _ = candidate_pairs(keys, config.max_block_size)
            acc: dict[bytes, int] = {}
            add_patterns(acc, compare_pairs(cache.table(), sample[ia], sample[ib]))
            patterns, counts = patterns_array(acc, len(FIELDS))
            sampled, pairs = len(sample), len(ia)
            if step == 1:  # every candidate pair of the index: from now on, count incrementally
                cache.patterns = acc
                state.set_meta("em_patterns", dump_patterns(acc))
        model = fit_patterns(patterns, counts, total, config)
        model.fitted_on_records = total
        blob = orjson.dumps(model.to_json()).decode()
        state.set_meta("model", blob)
        # if this transaction rolls back, the blob is not trusted again: the failure drops the cache,
        # so the next transaction is not the sole writer's, and records() forgets the blob
        state.model_blob, state.model_blob_known = blob, True
        # a new token makes every other writer re-read the EM counts (a recount may have replaced
        # them) before its next batch, instead of writing its own older copy over them
        state.bump_generation(cache, updated=False)
        log.info(
            "mpi.em_fit",
            records=total,
            sampled=sampled,
            pairs=pairs,
            iterations=model.iterations,
            match_rate=round(model.lam, 4),
        )
        return model
