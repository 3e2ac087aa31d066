// Owns the automatic `context` every event carries: the page, the campaign
// (utm_* and ad click ids), user agent, locale, timezone, screen and library.
// The page, campaign and screen are read per call, because SPA navigation
// changes the page under us; the rest once per page.

declare const __VERSION__: string;
export const VERSION: string = typeof __VERSION__ === 'string' ? __VERSION__ : '0.0.0';

const CLICK_IDS = ['gclid', 'fbclid', 'msclkid', 'ttclid', 'li_fat_id'];

export type Dict = Record<string, unknown>;

/** `page` properties (and `context.page`). `ref` is the document referrer, or
 * the previous URL after an SPA navigation. */
export function pageInfo(ref: string): Dict {
  const l = location;
  return { path: l.pathname, referrer: ref, search: l.search, title: document.title, url: l.href };
}

export function campaign(search: string): Dict | undefined {
  const c: Dict = {};
  new URLSearchParams(search).forEach((v, k) => {
    // Segment names utm_campaign "name"; the other utm_* keep their suffix.
    if (k.startsWith('utm_')) c[k === 'utm_campaign' ? 'name' : k.slice(4)] = v;
    else if (CLICK_IDS.includes(k)) c[k] = v;
  });
  return Object.keys(c).length ? c : undefined;
}

/** What does not change while the page lives, computed once: resolving the
 * time zone builds an Intl formatter, which cost more than the rest of a
 * track() call together (benches/RESULTS.md). */
let fixed: Dict | undefined;

export function context(ref: string): Dict {
  if (!fixed) {
    const n = navigator;
    let timezone: string | undefined;
    try {
      timezone = Intl.DateTimeFormat().resolvedOptions().timeZone;
    } catch {
      // Very old engines lack Intl; the field is simply left out.
    }
    fixed = { userAgent: n.userAgent, locale: n.language, timezone, library: { name: 'trailmark.js', version: VERSION } };
  }
  return {
    page: pageInfo(ref),
    campaign: campaign(location.search),
    screen: { width: screen.width, height: screen.height, density: devicePixelRatio },
    ...fixed,
  };
}
