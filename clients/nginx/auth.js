// nginx's auth check for the ophyd-websocket routes (njs, Debian's libnginx-mod-http-js).
//
// Configuration of nginx, not a service: `auth_request /_auth/check` runs `check` for each
// request to /ophyd/ (WebSocket handshakes included). It asks bluesky-httpserver, with the
// credentials the request carries, who the user is (/api/auth/whoami) and what they may do
// (/api/auth/scopes), and answers nginx with
//   200 + X-Auth-User, X-Seat-Port   the user's own ophyd-websocket seat;
//   401 + X-Auth-Detail              no credentials, or httpserver refused them;
//   403 + X-Auth-Detail              another site's page, a role without device access,
//                                    or no seat configured for this user;
//   500 + X-Auth-Detail              the check cannot be made (httpserver down): fail closed.
// A browser sends only cookies and the URL's query on a WebSocket, so an API key is
// accepted as the cookie bluesky_httpserver_api_key or as ?api_key=, like httpserver does;
// an Authorization header (ApiKey or Bearer) works for other clients.
// Written for njs 0.7.9 (Debian bookworm): no destructuring, no optional chaining.

// Printable ASCII for a header value that nginx later puts in a JSON string.
function clean(text) {
    return String(text).replace(/[^\x20-\x7e]/g, '?').replace(/["\\]/g, "'").slice(0, 400);
}

function refuse(r, status, detail) {
    r.headersOut['X-Auth-Detail'] = clean(detail);
    r.return(status);
}

// httpserver's own reason for a 401/403 ({"detail": "Invalid API key"}), else the status.
function reason(reply) {
    try {
        const detail = JSON.parse(reply.responseText).detail;
        if (typeof detail === 'string' && detail) {
            return detail;
        }
    } catch (e) {
        // not JSON: fall through
    }
    return 'bluesky-httpserver answered ' + reply.status;
}

async function check(r) {
    const v = r.variables;
    const host = r.headersIn.Host || '';
    const origin = r.headersIn.Origin;
    // A page of another site may open a WebSocket here, and the browser would send the
    // user's cookie with it (cross-site WebSocket hijacking): only our own pages may.
    if (origin && origin !== 'https://' + host) {
        return refuse(r, 403, 'cross-origin request refused: Origin ' + origin
                      + ' is not this site (https://' + host + ')');
    }
    const key = v.bl_api_key;   // the parent request's ?api_key= (set in its location)
    if (!key && !v.cookie_bluesky_httpserver_api_key && !r.headersIn.Authorization) {
        return refuse(r, 401, 'not authenticated: log in to bluesky-httpserver (/api/auth/) '
                      + 'and send its API key (cookie bluesky_httpserver_api_key, ?api_key= '
                      + 'or an Authorization header)');
    }
    let replies;
    try {
        replies = await Promise.all([r.subrequest('/_auth/whoami'),
                                     r.subrequest('/_auth/scopes')]);
    } catch (e) {
        return refuse(r, 500, 'the credentials cannot be checked: ' + e);
    }
    const who = replies[0];
    const allowed = replies[1];
    for (let i = 0; i < replies.length; i++) {
        const reply = replies[i];
        if (reply.status === 401 || reply.status === 403) {
            return refuse(r, 401, reason(reply));
        }
        if (reply.status !== 200) {
            return refuse(r, 500, 'the credentials cannot be checked: bluesky-httpserver '
                          + (reply.status === 502 || reply.status === 504
                             ? 'unreachable' : 'answered ' + reply.status));
        }
    }
    let user;
    let scopes;
    try {
        const ids = JSON.parse(who.responseText).identities || [];
        user = ids.length === 1 ? ids[0].id : '';
        scopes = JSON.parse(allowed.responseText).scopes || [];
    } catch (e) {
        return refuse(r, 500, 'unexpected answer from bluesky-httpserver: ' + e);
    }
    if (!user) {
        return refuse(r, 403, 'these credentials name no single user');
    }
    if (scopes.indexOf(v.bl_device_scope) < 0) {
        return refuse(r, 403, 'user ' + user + ' may not use the devices: these credentials '
                      + 'lack the scope ' + v.bl_device_scope);
    }
    const seats = JSON.parse(v.bl_seats);
    if (!Object.prototype.hasOwnProperty.call(seats, user)) {
        return refuse(r, 403, 'no device seat is configured for user ' + user);
    }
    r.headersOut['X-Auth-User'] = user;
    r.headersOut['X-Seat-Port'] = String(seats[user]);
    r.return(200);
}

// $bl_upstream_auth: the Authorization header of the questions to httpserver: the
// request's ?api_key= as "ApiKey <key>" (not in a URL, which httpserver would log), else
// the request's own header. The Cookie header goes along as it is.
function upstreamAuthorization(r) {
    const key = r.variables.bl_api_key;
    return key ? 'ApiKey ' + key : (r.headersIn.Authorization || '');
}

// $bl_seat_uri: what the seat is asked for: the normalized path nginx checked (r.uri),
// without the /ophyd prefix, re-encoded, and the query without api_key, so the user's key
// never reaches the seat.
function seatUri(r) {
    const path = r.uri.replace(/^\/ophyd/, '').split('/').map(encodeURIComponent).join('/');
    const kept = (r.variables.args || '').split('&').filter(function (pair) {
        return pair && pair.split('=')[0] !== 'api_key';
    });
    return path + (kept.length ? '?' + kept.join('&') : '');
}

export default {check, seatUri, upstreamAuthorization};
