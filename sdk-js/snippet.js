// The Trailmark snippet: paste it in <head>. It defines a stub
// `window.trailmark` that records calls made before the SDK arrives; the SDK
// replays them in order once loaded. Replace WRITE_KEY and API_HOST.
(function () {
  var tm = (window.trailmark = window.trailmark || []);
  // Guard against the snippet or the SDK being included twice.
  if (tm.initialize) return;
  if (tm.invoked) {
    if (window.console && console.error) console.error('Trailmark snippet included twice.');
    return;
  }
  tm.invoked = true;
  tm.methods = ['page', 'track', 'identify', 'group', 'alias', 'reset', 'ready', 'setConsent'];
  tm.factory = function (method) {
    return function () {
      var args = Array.prototype.slice.call(arguments);
      args.unshift(method);
      tm.push(args);
      return tm;
    };
  };
  for (var i = 0; i < tm.methods.length; i++) tm[tm.methods[i]] = tm.factory(tm.methods[i]);
  tm.load = function (writeKey, options) {
    var host = ((options && options.apiHost) || '').replace(/\/+$/, '');
    var s = document.createElement('script');
    s.async = true;
    // options.sdkUrl lets a site self-host the bundle; by default the
    // Trailmark server serves it.
    s.src = (options && options.sdkUrl) || host + '/sdk/v1/trailmark.min.js';
    var first = document.getElementsByTagName('script')[0];
    if (first && first.parentNode) first.parentNode.insertBefore(s, first);
    else document.head.appendChild(s);
    tm._writeKey = writeKey;
    tm._loadOptions = options;
  };
  tm.SNIPPET_VERSION = '1';
  tm.load('WRITE_KEY', { apiHost: 'API_HOST' });
  tm.page();
})();
