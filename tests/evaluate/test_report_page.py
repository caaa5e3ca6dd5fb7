"""report.html shows every value from the run's files as text: slide ids, class names, paths and
JSON values (numbers edited into markup included) never become elements or attributes."""

import html.parser
import json

import numpy as np
from PIL import Image

from pathjax import artifacts, cohort as cohort_lib, slide_paths
from pathjax.evaluate import report, report_page
from pathjax.metrics import split_metrics

SCRIPT = '<script>alert(1)</script>'
SLIDE_IDS = [SCRIPT, 'a"b&c', 'x" onerror="alert(2)', "y' onload='alert(3)", 'plain-1']
CLASSES = ('<marquee>negative</marquee>', 'positive "&" <blink>more</blink>')
PAGE_TAGS = {'html', 'head', 'meta', 'title', 'style', 'body', 'h1', 'h2', 'h3', 'p', 'a', 'b',
             'div', 'table', 'tr', 'th', 'td', 'img', 'figure', 'figcaption', 'details',
             'summary', 'pre'}  # the elements the page makes itself


class Page(html.parser.HTMLParser):
    """The elements, attributes and text of a page (entities decoded, as a browser would)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.attributes, self.texts = [], [], []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += attrs

    def handle_data(self, data):
        self.texts.append(data)


def picture(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(path)


def edited_json(path, **values):
    """Replaces top-level values of a JSON file, as a person editing it would."""
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def hostile_workdir(workdir):
    """A workdir with every section of the page, its strings and JSON values holding markup."""
    labels = np.arange(len(SLIDE_IDS)) % 2
    probabilities = np.random.default_rng(0).dirichlet(np.ones(2), len(SLIDE_IDS))
    for folder in (workdir / 'eval' / 'test', workdir / 'predict'):
        report.write_predictions(folder / 'predictions.csv', SLIDE_IDS, labels, probabilities,
                                 CLASSES)
        report.write_metrics(folder / 'metrics.json', {
            **split_metrics(probabilities, labels, SLIDE_IDS, CLASSES),
            'split': 'test', 'checkpoint': {'checkpoint': SCRIPT, 'epoch': SCRIPT}})
        edited_json(folder / 'metrics.json', split=SCRIPT, num_slides=SCRIPT, auc=SCRIPT,
                    auc_ci95=[SCRIPT, 1], accuracy=SCRIPT)
        picture(folder / 'roc.png')
        for slide_id in SLIDE_IDS:
            picture(folder / 'heatmaps' / f'{slide_id}.png')
            picture(folder / 'top_patches' / slide_id / '1.png')
    picture(workdir / 'eval' / 'learning_curves.png')
    cohort = cohort_lib.Cohort(slides=tuple(cohort_lib.SlideRecord(
        slide_id=s, path=f'/data/{s}.svs', label=CLASSES[i % 2], case_id=f'case {s}',
        split=('train', 'test')[i % 2], line=i + 2) for i, s in enumerate(SLIDE_IDS)), skipped=())
    artifacts.save_text(workdir / 'cohort.csv', cohort_lib.cohort_csv(cohort))
    artifacts.save_json(workdir / 'reports' / 'tile.json', {
        'counts': {SCRIPT: 1, 'ok': len(SLIDE_IDS) - 1},
        'slides': [{'slide_id': s, 'status': SCRIPT if i == 0 else 'ok', 'patches': SCRIPT,
                    'message': SCRIPT} for i, s in enumerate(SLIDE_IDS)]})
    for slide_id in SLIDE_IDS:
        picture(workdir / 'qc' / f'{slide_id}.png')
    fold = {'fold': 0, 'num_slides': SCRIPT, 'auc': SCRIPT, 'accuracy': 0.5,
            'balanced_accuracy': 0.5, 'f1': None, 'patient_auc': 0.5, 'auc_ci95': SCRIPT}
    keys = ('auc', 'accuracy', 'balanced_accuracy', 'f1', 'patient_auc')
    artifacts.save_json(workdir / 'cv' / 'summary.json', {
        'folds': [fold], 'mean': dict.fromkeys(keys, SCRIPT), 'sd': dict.fromkeys(keys, 0.1),
        'pooled': {**dict.fromkeys(keys, SCRIPT), 'patient': {'auc': SCRIPT}},
        'num_slides': SCRIPT, 'auc': SCRIPT, 'auc_ci95': [SCRIPT, SCRIPT]})
    (workdir / 'folds' / '0').mkdir(parents=True)
    (workdir / 'folds' / '0' / 'report.html').write_text('fold 0')
    artifacts.save_json(workdir / 'config.json', {'data': {'manifest': SCRIPT, 'classes': CLASSES}})


def test_every_value_shows_as_text(tmp_path):
    workdir = tmp_path / 'run <script>alert(4)</script> & "co"'
    hostile_workdir(workdir)
    page = Page(report_page.write(workdir).read_text())
    assert set(page.tags) <= PAGE_TAGS, set(page.tags) - PAGE_TAGS
    assert not [name for name, _ in page.attributes if name.startswith('on')]
    for anchor in ('results', 'cv', 'learning', 'heatmaps', 'predict', 'cohort', 'tiles',
                   'config'):
        assert ('id', anchor) in page.attributes, anchor
    text = ''.join(page.texts)
    for value in (*SLIDE_IDS, *CLASSES, f'case {SLIDE_IDS[2]}', str(workdir)):
        assert value in text, value
    assert f'{SCRIPT} split ({SCRIPT} slides)' in text
    assert f'AUC {SCRIPT} (95% CI {SCRIPT}–{SCRIPT}) over {SCRIPT} test slides' in text
    assert f'On the {SCRIPT} labelled slides: AUC {SCRIPT} (95% CI {SCRIPT}–1)' in text
    assert f'checkpoint: {SCRIPT}, epoch {SCRIPT}' in text
    assert json.dumps(SCRIPT) in text  # config.json, verbatim
    alts = [value for name, value in page.attributes if name == 'alt']
    for slide_id in SLIDE_IDS:  # pictures of ids that cannot name a file are not looked up
        shown = slide_paths.id_problem(slide_id) is None
        assert (f'heatmap {slide_id}' in alts) == shown and (f'QC {slide_id}' in alts) == shown
        assert (f'{slide_id} patch 1' in alts) == shown
    assert f'ROC {SCRIPT}' in alts
