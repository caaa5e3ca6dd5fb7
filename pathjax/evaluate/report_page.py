"""`<workdir>/report.html`: one self-contained page (every image inline) with what a pathologist
and a principal investigator need to judge a run.

Sections, each present when the run has made what it shows: the results (metrics with 95% CIs at
slide and patient level, ROC curves and confusion matrices per evaluated split; the
cross-validation table), learning curves of both training stages, heatmaps with each slide's
top-scoring patches (full resolution), predictions for new slides, the cohort and its splits,
the tile report (failures and warnings first) with QC pictures, and the config. Written by the
pipeline at the end of every run from the files in the workdir, so it reflects the stages done.
Every value read from those files (slide ids, class names, paths, numbers) is put in the page
through `escape`: it shows as text, never as markup.
"""

import base64
import datetime
import html
import io
import json
import pathlib
from collections import Counter
from typing import Iterable

from PIL import Image

from pathjax import artifacts, csv_cells
from pathjax.evaluate.heatmaps import heatmap_path
from pathjax.evaluate.top_patches import top_patches_dir
from pathjax.slide_paths import SlideIdError
from pathjax.slides import tissue_qc
from pathjax.slides.tile_stage import qc_path

PAGE = 'report.html'
MAX_HEATMAP_SLIDES = 24  # per split; the rest are in eval/<split>/heatmaps/
MAX_QC_PICTURES = 60  # failures and warnings first; the rest are in qc/
SECTIONS = (('results', 'Results'), ('cv', 'Cross-validation'), ('compare', 'Model comparison'),
            ('learning', 'Learning curves'),
            ('heatmaps', 'Heatmaps'), ('predict', 'New slides'), ('cohort', 'Cohort'),
            ('features', 'Features'), ('tiles', 'Tile report'), ('config', 'Config'))  # (anchor, title) in page order
HEATMAP_WIDTH = 720  # px of the inline heatmap picture
QC_SIDE = 240  # px, long side of an inline QC picture

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.bad { background: #fdd; } .warn { background: #ffd; } .muted { color: #777; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.grid figure { margin: 0; font-size: 0.8em; max-width: 260px; }
.row { display: flex; gap: 24px; align-items: flex-start; } .row > img { width: 420px; }
.slide { margin-bottom: 1.5em; }
.patches img { margin-right: 4px; border: 1px solid #999; min-width: 128px; image-rendering: pixelated; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.8em; }
"""


def escape(value) -> str:
    """`value` as text for an HTML element or a quoted attribute value (& < > " ' escaped)."""
    return html.escape(str(value), quote=True)


def _image(data: bytes, mime: str, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ''
    return (f'<img alt="{escape(alt)}"{size} '
            f'src="data:{mime};base64,{base64.b64encode(data).decode()}">')


def png(path: pathlib.Path, alt: str) -> str:
    """An <img> of a PNG file as it is."""
    return _image(path.read_bytes(), 'image/png', alt)


def jpeg(path: pathlib.Path, alt: str, max_side: int | None = None) -> str:
    """An <img> of an image file as JPEG, shrunk to `max_side` px when larger (None: as is)."""
    image = Image.open(path).convert('RGB')
    if max_side:
        image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, format='JPEG', quality=90)
    return _image(out.getvalue(), 'image/jpeg', alt)


def table(header: Iterable[str], rows: list[list], classes: list[str] | None = None) -> str:
    """An HTML table; `classes`: a CSS class per row ('' for none)."""
    head = ''.join(f'<th>{escape(h)}</th>' for h in header)
    body = []
    for row, css in zip(rows, classes or [''] * len(rows)):
        cells = ''.join(f'<td>{escape(c)}</td>' for c in row)
        body.append(f'<tr class="{escape(css)}">{cells}</tr>' if css else f'<tr>{cells}</tr>')
    return f'<table><tr>{head}</tr>{"".join(body)}</table>'


def number(value, digits: int = 3) -> str:
    """A float rounded to `digits`, None as '–', anything else as it is (to be escaped)."""
    return '–' if value is None else f'{value:.{digits}f}' if isinstance(value, float) else str(value)


def ci(interval) -> str:
    """'low–high' of a [low, high] interval, '–' when either is unknown; anything else as it is
    (to be escaped)."""
    if not isinstance(interval, (list, tuple)) or len(interval) != 2:
        return number(interval)
    low, high = interval
    return '–' if low is None or high is None else f'{number(low)}–{number(high)}'


def read_json(path: pathlib.Path):
    return json.loads(path.read_text()) if path.exists() else None


def read_csv(path: pathlib.Path) -> list[dict]:
    return csv_cells.read_records(path) if path.exists() else []


# Sections -----------------------------------------------------------------------------------------


def metrics_section(workdir: pathlib.Path) -> str:
    splits = sorted((workdir / 'eval').glob('*/metrics.json'),
                    key=lambda p: ('test', 'val', 'train').index(p.parent.name)
                    if p.parent.name in ('test', 'val', 'train') else 9)
    if not splits:
        return ''
    metrics = {path: json.loads(path.read_text()) for path in splits}
    rows = []
    for m in metrics.values():
        for level, values, count in (('slide', m, m['num_slides']),
                                     ('patient', m['patient'], m['patient']['num_cases'])):
            rows.append([m['split'], level, count, number(values['auc']), ci(values['auc_ci95']),
                         number(values['accuracy']), number(values['balanced_accuracy']),
                         number(values['f1'])])
    out = ['<h2 id="results">Results</h2>',
           '<p>AUC with a stratified bootstrap 95% confidence interval; patient level: the '
           'slides of a case averaged. Test metrics come from the evaluate stage alone.</p>',
           table(['split', 'level', 'n', 'AUC', '95% CI', 'accuracy', 'balanced accuracy', 'F1'],
                 rows), clinical_table(metrics.values())]
    for path, m in metrics.items():
        names = m['class_names']
        confusion = table(['true \\ predicted', *names],
                          [[name, *row] for name, row in zip(names, m['confusion_matrix'])])
        per_class = table(['class', 'slides', 'recall', 'precision', 'AUC (one vs rest)'],
                          [[name, v['support'], number(v['recall']), number(v['precision']),
                            number(v.get('auc'))] for name, v in m['per_class'].items()])
        checkpoint = m.get('checkpoint') or {}
        roc, calibration = path.parent / 'roc.png', path.parent / 'calibration.png'
        out += [f'<h3>{escape(m["split"])} split ({escape(m["num_slides"])} slides)</h3>',
                '<div class="row">' + (png(roc, f'ROC {m["split"]}') if roc.exists() else '')
                + (png(calibration, f'calibration {m["split"]}') if calibration.exists() else '')
                + '<div>',
                '<p>Confusion matrix (slides)</p>', confusion, per_class,
                f'<p class="muted">checkpoint: {escape(checkpoint.get("checkpoint"))}, '
                f'epoch {escape(checkpoint.get("epoch"))}</p></div></div>']
    return '\n'.join(out)


def comparison_section(workdir: pathlib.Path) -> str:
    """The model comparison: each model's fold AUCs, pooled AUC with CI, and the paired test
    against the first model (slide and patient level), and the forest plot."""
    summary = read_json(workdir / 'compare' / 'summary.json')
    if not summary:
        return ''
    rows = []
    for entry in summary['models']:
        for level in ('slide', 'patient'):
            row = summary.get(level, {}).get(entry)
            if row is None:
                continue
            paired = row.get('vs_first') or {}
            rows.append([entry, level, ' '.join(number(a) for a in summary['folds'][entry]),
                         f"{number(summary['mean'][entry])} +/- {number(summary['sd'][entry])}",
                         number(row['auc']), ci(row['auc_ci95']), number(row.get('auprc')),
                         number(row.get('brier')), number(paired.get('difference')),
                         ci(paired.get('ci95')),
                         number(paired.get('p_value'), 4)])
    forest = workdir / 'compare' / 'forest.png'
    return '\n'.join([
        '<h2 id="compare">Model comparison</h2>',
        f'<p>The same features and folds for every model; {escape(summary["num_slides"])} '
        f'slides out of fold. Pooled AUC with DeLong\'s 95% CI; the difference to '
        f'{escape(summary["models"][0])} with its 95% CI and DeLong\'s p-value for correlated '
        'ROC curves.</p>',
        table(['model', 'level', 'fold AUCs', 'mean +/- sd', 'pooled AUC', '95% CI', 'AUPRC',
               'Brier', 'difference', '95% CI', 'p'], rows),
        png(forest, 'forest plot') if forest.exists() else ''])


def clinical_table(metrics) -> str:
    """AUPRC, Brier score and the operating points (at the validation split's Youden threshold
    and at 0.5) of each evaluated split, slide and patient level (binary tasks)."""
    rows = []
    for m in metrics:
        for level, values in (('slide', m), ('patient', m['patient'])):
            clinical = values.get('clinical') or {}
            if 'at_0.5' not in clinical:
                continue
            for name in ('at_threshold', 'at_0.5'):
                point = clinical.get(name)
                if point:
                    rows.append([m['split'], level, number(point['threshold']),
                                 number(clinical['auprc']), number(clinical['brier']),
                                 *(number(point[k]) for k in ('sensitivity', 'specificity',
                                                              'ppv', 'npv'))])
    if not rows:
        return ''
    return ('<p>Operating points: at the threshold chosen on the validation slides (Youden) '
            'and at 0.5; AUPRC and Brier score do not depend on it.</p>'
            + table(['split', 'level', 'threshold', 'AUPRC', 'Brier', 'sensitivity',
                     'specificity', 'PPV', 'NPV'], rows))


def cross_validation_section(workdir: pathlib.Path) -> str:
    summary = read_json(workdir / 'cv' / 'summary.json')
    if not summary:
        return ''
    keys = ('auc', 'accuracy', 'balanced_accuracy', 'f1', 'patient_auc')
    rows = [[f['fold'], f['num_slides'], *(number(f[k]) for k in keys), ci(f['auc_ci95'])]
            for f in summary['folds']]
    rows.append(['mean ± sd', '', *(f'{number(summary["mean"][k])} ± {number(summary["sd"][k])}'
                                     for k in keys), ''])
    pooled = summary['pooled']
    rows.append(['pooled out-of-fold', summary['num_slides'],
                 *(number(pooled[k]) for k in keys[:-1]), number(pooled['patient']['auc']),
                 ci(summary['auc_ci95'])])
    folds = sorted((workdir / 'folds').glob('*/report.html'))
    links = ' '.join(f'<a href="{escape(p.relative_to(workdir))}">fold '
                     f'{escape(p.parent.name)}</a>' for p in folds)
    return '\n'.join([
        '<h2 id="cv">Cross-validation</h2>',
        f'<p>Pooled out-of-fold AUC {escape(number(summary["auc"]))} (95% CI '
        f'{escape(ci(summary["auc_ci95"]))}) over {escape(summary["num_slides"])} test slides. '
        f'Each fold\'s own report: {links}</p>',
        table(['fold', 'test slides', 'AUC', 'accuracy', 'balanced accuracy', 'F1',
               'patient AUC', 'AUC 95% CI'], rows)])


def learning_curves_section(workdir: pathlib.Path) -> str:
    path = workdir / 'eval' / 'learning_curves.png'
    if not path.exists():
        return ''
    return ('<h2 id="learning">Learning curves</h2>'
            '<p>Feature learning (patches) and slide training, per epoch.</p>'
            + png(path, 'learning curves'))


def existing(slide_path, folder: pathlib.Path, slide_id: str) -> bool:
    """Whether `slide_path(folder, slide_id)` exists; False for an id read back from a file
    that pathjax could not have written (not a safe file name: `slide_paths`)."""
    try:
        return slide_path(folder, slide_id).exists()
    except SlideIdError:
        return False


def slide_figures(folder: pathlib.Path, predictions: list[dict], title: str) -> str:
    """Heatmaps of `folder/heatmaps` with the top patches of `folder/top_patches`, captioned by
    their row of predictions.csv."""
    if not (folder / 'heatmaps').is_dir():
        return ''
    out = [f'<h3>{escape(title)}</h3>']
    shown = [row for row in predictions
             if existing(heatmap_path, folder, row['slide_id'])]
    for row in shown[:MAX_HEATMAP_SLIDES]:
        slide_id = row['slide_id']
        probabilities = ', '.join(f'{k[5:]} {float(v):.2f}' for k, v in row.items()
                                  if k.startswith('prob_'))
        patches = sorted(top_patches_dir(folder, slide_id).glob('*.png'),
                         key=lambda p: int(p.stem))
        out.append(
            f'<div class="slide"><p><b>{escape(slide_id)}</b>: predicted '
            f'{escape(row["pred"])} ({escape(probabilities)}), label '
            f'{escape(row["label"] or "unknown")}</p>'
            + jpeg(heatmap_path(folder, slide_id), f'heatmap {slide_id}', HEATMAP_WIDTH)
            + (f'<p>Top {len(patches)} patches (full resolution, as the network saw them):</p>'
               f'<div class="patches">' + ''.join(jpeg(p, f'{slide_id} patch {p.stem}')
                                                   for p in patches) + '</div>' if patches else '')
            + '</div>')
    if len(shown) > MAX_HEATMAP_SLIDES:
        out.append(f'<p class="muted">{len(shown) - MAX_HEATMAP_SLIDES} more in '
                   f'{escape(folder / "heatmaps")}</p>')
    return '\n'.join(out)


def heatmaps_section(workdir: pathlib.Path) -> str:
    parts = [slide_figures(workdir / 'eval' / split, read_csv(
        workdir / 'eval' / split / 'predictions.csv'), f'{split} split')
        for split in ('test', 'val', 'train')]
    parts = [p for p in parts if p]
    if not parts:
        return ''
    return ('<h2 id="heatmaps">Heatmaps</h2><p>Each patch coloured by its score (attention weight, '
            'or contribution to the predicted class), and the slide\'s highest-scoring '
            'patches.</p>' + '\n'.join(parts))


def predict_section(workdir: pathlib.Path) -> str:
    folder = workdir / 'predict'
    predictions = read_csv(folder / 'predictions.csv')
    if not predictions:
        return ''
    columns = list(predictions[0])
    out = ['<h2 id="predict">New slides</h2>',
           f'<p>{len(predictions)} slides of the prediction manifest (predict/predictions.csv).</p>',
           table(columns, [[row[c] for c in columns] for row in predictions])]
    metrics = read_json(folder / 'metrics.json')
    if metrics:
        out.append(f'<p>On the {escape(metrics["num_slides"])} labelled slides: AUC '
                   f'{escape(number(metrics["auc"]))} (95% CI {escape(ci(metrics["auc_ci95"]))}),'
                   f' accuracy {escape(number(metrics["accuracy"]))}.</p>')
    out.append(slide_figures(folder, predictions, 'Heatmaps of the new slides'))
    return '\n'.join(out)


def cohort_section(workdir: pathlib.Path) -> str:
    cohort = read_csv(workdir / 'cohort.csv')
    if not cohort:
        return ''
    group = 'test_fold' if 'test_fold' in cohort[0] else 'split'  # a cross-validation root
    order = {'train': 0, 'val': 1, 'test': 2}
    groups = sorted({row[group] for row in cohort}, key=lambda g: (order.get(g, 3), g))
    labels = sorted({row['label'] for row in cohort})
    counts = Counter((row[group], row['label']) for row in cohort)
    rows = [[g, len({r['case_id'] for r in cohort if r[group] == g}),
             *(counts[g, label] for label in labels), sum(counts[g, label] for label in labels)]
            for g in groups]
    return '\n'.join([
        '<h2 id="cohort">Cohort</h2>',
        table(['test fold' if group == 'test_fold' else 'split', 'cases', *labels, 'slides'],
              rows),
        '<details><summary>Every slide</summary>',
        table(['slide', 'case', 'label', group.replace('_', ' ')],
              [[r['slide_id'], r['case_id'], r['label'], r[group]] for r in cohort]),
        '</details>'])


def tile_section(workdir: pathlib.Path) -> str:
    tile = read_json(workdir / 'reports' / 'tile.json')
    if not tile:
        return ''
    entries = tile['slides']
    rank = {'error': 0, 'no_tissue': 1}
    entries = sorted(entries, key=lambda e: (rank.get(e['status'], 2 if e['message'] else 3),
                                             e['slide_id']))
    flagged = [e for e in entries if e['status'] != 'ok' or e['message']]
    counts = ', '.join(f'{n} {status}' for status, n in sorted(tile['counts'].items()))
    out = ['<h2 id="tiles">Tile report</h2>', f'<p>{escape(counts)}.</p>']
    if flagged:
        out.append(table(['slide', 'status', 'patches', 'message'],
                         [[e['slide_id'], e['status'], e['patches'], e['message']] for e in flagged],
                         ['bad' if e['status'] != 'ok' else 'warn' for e in flagged]))
    causes = [c for c in tissue_qc.CAUSES[1:] if any(e.get('dropped', {}).get(c) for e in entries)]
    if causes:
        out += ['<h3>Patches dropped by quality control</h3>',
                '<p>Per slide, the tissue patches dropped for ink (pen), folds and blur '
                '(tissue.remove_pen, tissue.remove_folds, tissue.max_blur), flagged slides first.'
                '</p>',
                table(['slide', 'kept', *causes, 'flags'],
                      [[e['slide_id'], e['patches'], *(e.get('dropped', {}).get(c, 0) for c in causes),
                        ', '.join(e.get('qc_flags', []))] for e in entries],
                      ['warn' if e.get('qc_flags') else '' for e in entries])]
    pictures = [e for e in entries if existing(qc_path, workdir, e['slide_id'])]
    figures = [f'<figure class="{"" if e["status"] == "ok" and not e["message"] else "warn"}">'
               + jpeg(qc_path(workdir, e['slide_id']), f'QC {e["slide_id"]}', QC_SIDE)
               + f'<figcaption>{escape(e["slide_id"])}: {escape(e["patches"])} patches'
               f'{", " + escape(e["status"]) if e["status"] != "ok" else ""}</figcaption>'
               '</figure>' for e in pictures[:MAX_QC_PICTURES]]
    if figures:
        out += ['<h3>QC pictures</h3><p>Kept patches outlined green over each slide, background '
                'shaded blue, ink magenta, folds orange, blurred patches crossed yellow (flagged '
                'slides first).</p>', '<div class="grid">' + ''.join(figures) + '</div>']
    if len(pictures) > MAX_QC_PICTURES:
        out.append(f'<p class="muted">{len(pictures) - MAX_QC_PICTURES} more in qc/</p>')
    return '\n'.join(out)


def import_section(workdir: pathlib.Path) -> str:
    """Where imported features came from (the import report): folder, format, encoder, size,
    and the slides whose files could not be used."""
    report = read_json(workdir / 'reports' / 'import.json')
    if not report:
        return ''
    entries = report['slides']
    used = Counter((str(pathlib.Path(e['file']).parent), e['format'], e['encoder'] or 'not recorded',
                    e['feature_dim']) for e in entries if e['status'] == 'ok')
    failed = [e for e in entries if e['status'] != 'ok']
    out = ['<h2 id="features">Features</h2>',
           '<p>Imported from files written by another tool (the tile, patches, learn_features and '
           'extract stages did not run).</p>',
           table(['folder', 'format', 'encoder', 'feature size', 'slides'],
                 [[*key, n] for key, n in sorted(used.items())])]
    if failed:
        out += ['<h3>Not imported</h3>',
                table(['slide', 'message'], [[e['slide_id'], e['message']] for e in failed],
                      ['bad'] * len(failed))]
    return '\n'.join(out)


def config_section(workdir: pathlib.Path) -> str:
    path = workdir / 'config.json'
    if not path.exists():
        return ''
    return ('<h2 id="config">Config</h2><details><summary>config.json</summary><pre>'
            + escape(path.read_text()) + '</pre></details>')


def write(workdir) -> pathlib.Path:
    """Writes `<workdir>/report.html` from the run's files and returns its path."""
    workdir = pathlib.Path(workdir)
    sections = [metrics_section(workdir), cross_validation_section(workdir),
                comparison_section(workdir),
                learning_curves_section(workdir), heatmaps_section(workdir),
                predict_section(workdir), cohort_section(workdir), import_section(workdir),
                tile_section(workdir),
                config_section(workdir)]
    sections = [s for s in sections if s]
    contents = ' · '.join(f'<a href="#{anchor}">{escape(name)}</a>'
                          for anchor, name in SECTIONS if any(f'id="{anchor}"' in s for s in sections))
    when = datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')
    page = '\n'.join([
        '<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
        f'<title>pathjax report: {escape(workdir.name)}</title>',
        f'<style>{STYLE}</style></head><body>',
        f'<h1>pathjax report: {escape(workdir)}</h1>',
        f'<p class="muted">Written {escape(when)}.</p>', f'<p>{contents}</p>',
        *sections, '</body></html>'])
    path = workdir / PAGE
    artifacts.save_text(path, page + '\n')
    return path
