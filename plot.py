"""
A run's curves as a picture: the training loss, and the FID when --fid-every measures it, against the step, drawn
from the entries of log.jsonl with PIL alone (no plotting package). train.py redraws runs/<name>/loss.png at every
log line; a resumed run's log holds the whole run, so the picture does too.

    import plot, checkpoint
    plot.draw_log(checkpoint.read_log('runs/moons/log.jsonl'), 'runs/moons/loss.png')

The value axes are logarithmic. The IMM loss of our CPU runs moves within a factor of 1.3 (moons: 0.70 at step 10,
0.55 at step 6000), where log and linear look alike and the ticks are plain numbers; a loss spike, or a run that
diverges, spans decades, and a log axis keeps the rest of the curve readable. FID runs from hundreds to a few units.
"""
import math

from PIL import Image, ImageDraw, ImageFont

WIDTH, PANEL_HEIGHT = 900, 330                # pixels of the picture, and of each panel (loss; FID when measured)
MARGIN = dict(left=80, right=20, top=34, bottom=46)
CURVES = [('loss', 'training loss (mean over each log interval)', (31, 119, 180)),
          ('fid_1step', 'FID, 1 step', (214, 39, 40)), ('fid_2step', 'FID, 2 steps', (44, 160, 44))]


def draw_log(entries, path):
    """Write a PNG of the log entries (dicts with 'step' and 'loss', or 'fid_1step' and 'fid_2step') to path: a
    loss panel, and an FID panel below it when the log has FID entries."""
    panels = [[CURVES[0]]] + ([CURVES[1:]] if any('fid_2step' in e for e in entries) else [])
    last_step = max([e['step'] for e in entries] + [1])
    image = Image.new('RGB', (WIDTH, PANEL_HEIGHT * len(panels)), 'white')
    draw, font = ImageDraw.Draw(image), _font()
    for i, curves in enumerate(panels):
        series = [(label, color, [(e['step'], e[key]) for e in entries
                                  if key in e and math.isfinite(e[key]) and e[key] > 0]) for key, label, color in curves]
        _panel(draw, font, i * PANEL_HEIGHT, last_step, series)
    image.save(path)


def _panel(draw, font, top, last_step, series):
    """One panel at pixel row `top`: frame, step ticks, log-scale value ticks, the curves and their legend."""
    x0, x1 = MARGIN['left'], WIDTH - MARGIN['right']
    y0, y1 = top + MARGIN['top'], top + PANEL_HEIGHT - MARGIN['bottom']
    values = [v for _, _, points in series for _, v in points] or [1.0]
    lo, hi = math.log10(min(values)), math.log10(max(values))
    pad = max(0.05 * (hi - lo), 0.02)
    lo, hi = lo - pad, hi + pad
    px = lambda step: x0 + (x1 - x0) * step / last_step
    py = lambda v: y1 - (y1 - y0) * (math.log10(v) - lo) / (hi - lo)
    for step in _linear_ticks(0, last_step):
        draw.line([(px(step), y0), (px(step), y1)], fill=(232, 232, 232))
        draw.text((px(step), y1 + 6), _short(step), fill='black', font=font, anchor='ma')
    for v in _log_ticks(lo, hi):
        draw.line([(x0, py(v)), (x1, py(v))], fill=(232, 232, 232))
        draw.text((x0 - 6, py(v)), f'{v:.3g}', fill='black', font=font, anchor='rm')
    draw.rectangle([x0, y0, x1, y1], outline='black')
    draw.text(((x0 + x1) / 2, y1 + 26), 'step', fill='black', font=font, anchor='ma')
    for i, (label, color, points) in enumerate(series):
        xy = [(px(s), py(v)) for s, v in points]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for x, y in xy if len(xy) < 60 else xy[-1:]:     # a few measurements (FID): each one as a dot
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        latest = f' (last {points[-1][1]:.4g} at step {points[-1][0]})' if points else ' (none yet)'
        draw.text((x0 + 260 * i, top + 10), label + latest, fill=color, font=font)


def _linear_ticks(lo, hi):
    """Round values from lo to hi, 1, 2 or 5 times a power of ten apart, at most 10 of them."""
    size = 10 ** math.floor(math.log10(max(hi - lo, 1e-12)))
    spacing = next(m * size / 10 for m in (1, 2, 5, 10, 20, 50) if (hi - lo) / (m * size / 10) <= 10)
    return [k * spacing for k in range(math.ceil(lo / spacing), math.floor(hi / spacing) + 1)]


def _log_ticks(lo, hi):
    """Values between 10^lo and 10^hi to label: the powers of ten; 1x, 2x and 5x them when fewer than 3 powers show;
    round linear steps where that still gives fewer than 3 (a range of less than a decade or so)."""
    for multiples in ((1,), (1, 2, 5)):
        ticks = [m * 10.0 ** d for d in range(math.floor(lo), math.ceil(hi) + 1) for m in multiples]
        ticks = [v for v in ticks if lo <= math.log10(v) <= hi]
        if len(ticks) >= 3:
            return ticks
    return [v for v in _linear_ticks(10 ** lo, 10 ** hi) if v > 0]


def _short(step):
    """A step as a tick label: 1500, 20k, 1.2M."""
    for scale, suffix in ((1e6, 'M'), (1e3, 'k')):
        if step >= scale and step % (scale / 10) == 0:
            return f'{step / scale:g}{suffix}'
    return f'{step:g}'


def _font():
    """PIL's built-in font at a readable size (a scalable one since Pillow 10.1; the small bitmap one before)."""
    try:
        return ImageFont.load_default(size=14)
    except TypeError:
        return ImageFont.load_default()
